import numpy as np
import pytest

from fleetlm.route.features import (
    RESPONSE_FEATURES,
    CalcError,
    Embedder,
    arithmetic_checks,
    final_answer,
    prompt_features,
    response_features,
    safe_eval,
)


def test_safe_eval():
    assert safe_eval("3*60") == 180
    assert safe_eval("(2 + 3) x 4") == 20
    assert safe_eval("1,200 / 4") == 300
    assert safe_eval("$5 - 7") == -2
    for bad in ("__import__('os')", "a + 1", "2 ** 999", "1 / 0", "[1, 2]"):
        with pytest.raises(CalcError):
            safe_eval(bad)


def test_arithmetic_checks_catch_slips():
    good = "So 3 x 60 = <<3*60=180>>180 meters. 180 x 3 = 540.\n#### 540"
    bad = "He has 12 + 7 = 21 apples, and 21 * 2 = 42.\n#### 42"
    assert arithmetic_checks(good) == (2, 0)
    assert arithmetic_checks(bad) == (2, 1)
    assert final_answer(good) == 540
    assert final_answer("The answer is $1,250.") == 1250
    assert final_answer("no number here") is None


def test_response_features_shape_and_signal():
    good = response_features("Tom has 12 apples and 7 more", "12 + 7 = 19\n#### 19")
    bad = response_features("Tom has 12 apples and 7 more", "12 + 7 = 21\n#### 21")
    assert good.shape == bad.shape == (len(RESPONSE_FEATURES),)
    i = RESPONSE_FEATURES.index("any_wrong")
    assert good[i] == 0 and bad[i] == 1
    assert good[RESPONSE_FEATURES.index("has_final")] == 1
    assert response_features("q", "")[RESPONSE_FEATURES.index("empty")] == 1
    p = prompt_features("Is 2+2=4?\nA. yes\nB. no\nAnswer:")
    assert p[4] == 2  # two options found


def test_response_checks_find_chained_slips_cut_offs_and_invented_numbers():
    # 425 / 5 = 85, not 91: a wrong middle step of a chain is caught
    chained = "Tuesday: 425 / 5 + 17 = <<425/5+17=91+17=108>>108 letters.\n#### 108"
    assert arithmetic_checks(chained) == (1, 1)
    assert arithmetic_checks("So 425 / 5 + 17 = 85 + 17 = 102.") == (1, 0)
    names = RESPONSE_FEATURES.index
    question = "Wendi feeds 20 chickens 3 cups each. She gave 15 cups and 25 cups. How many cups are left?"
    cut = response_features(question, "She gave 15 + 25 = <<15+2")
    assert cut[names("truncated")] == 1 and cut[names("has_final")] == 0
    done = response_features(question, "20 x 3 = 60. 15 + 25 = 40. 60 - 40 = 20.\n#### 20")
    assert done[names("truncated")] == 0 and done[names("unused_prompt_numbers")] == 0
    assert done[names("any_wrong")] == 0 and done[names("last_calc_matches_final")] == 1
    # 17 appears nowhere in the question and is no common constant; the 20 chickens are never used
    invented = response_features(question, "15 + 25 + 17 = 57.\n#### 57")
    assert invented[names("unsupported_operands")] > 0 and invented[names("any_unused")] == 1
    assert response_features(question, "#### 12.5")[names("final_fraction")] == 1


def test_embedder_caches_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = Embedder(cache_dir=tmp_path)
    texts = ["What is the capital of France?", "Solve x + 2 = 5.", "What is the capital of France?"]
    first = emb(texts)
    assert first.shape == (3, 384)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-4)
    assert np.allclose(first[0], first[2])
    assert len(list(tmp_path.rglob("*.f32"))) == 2  # one file per distinct text
    # a fresh embedder must not touch the model for cached texts
    again = Embedder(cache_dir=tmp_path)
    monkeypatch.setattr(
        again, "encode_uncached", lambda t: (_ for _ in ()).throw(AssertionError("re-embedded"))
    )
    assert np.allclose(again(texts), first)
    # similar texts are closer than unrelated ones
    sims = emb(["capital city of France", "integral of x squared"]) @ first[0]
    assert sims[0] > sims[1]


def test_fast_encoder_matches_sentence_transformers(monkeypatch):
    """The direct tokenizer + forward path (bf16 where the CPU has it) gives the vectors that
    SentenceTransformer.encode gives: same token ids, cosine >= 0.999, so cached embeddings stay valid."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from fleetlm.route.features import MiniLMEncoder, minilm_model_path

    texts = [
        "What is the capital of France?",
        "Which of the following is NOT a noble gas?\nA. Neon\nB. Argon\nC. Nitrogen\nD. Xenon\nAnswer:",
        "Tom has 3 boxes of 12 eggs and breaks 5. How many eggs are left? " * 3,
        "a " * 600,  # longer than 256 tokens: truncated like sentence-transformers does
        "",
    ]
    st = SentenceTransformer(str(minilm_model_path()), device="cpu")
    ref = st.encode(texts, normalize_embeddings=True)
    ref_ids = st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)["input_ids"]
    for precision in ("auto", "fp32"):
        enc = MiniLMEncoder(precision=precision)
        assert enc.precision in ("bf16", "fp32")
        assert enc.token_ids(texts) == ref_ids
        batched = enc.encode(texts, batch_size=2)  # padded batches, sorted by length
        single = np.concatenate([enc.encode([t]) for t in texts])
        assert batched.shape == (len(texts), 384)
        assert (batched * ref).sum(1).min() >= 0.999
        assert (single * ref).sum(1).min() >= 0.999
        if enc.precision == "fp32":
            assert (batched * ref).sum(1).min() >= 0.99999


def test_encoder_rejects_bad_settings(tmp_path):
    from fleetlm.route.features import EmbeddingError, MiniLMEncoder

    with pytest.raises(EmbeddingError, match="precision"):
        MiniLMEncoder(precision="int3")
    with pytest.raises(EmbeddingError, match="not found"):
        MiniLMEncoder(model_path=tmp_path)
