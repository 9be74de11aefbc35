"""Engine on real tiny checkpoints: greedy output equals transformers' generate token for token (single and
batched, all three families), seeded sampling is reproducible, stop strings, chat, dtypes."""

import os
import time

import pytest
import torch

from fleetlm.engine import DTYPES, Engine, GenerationRequest, UnsupportedDtypeError
from fleetlm.errors import CheckpointError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["Hello world, this is", "The quick brown fox jumps over the lazy dog and then", "a"]
NEW_TOKENS = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core box: a second OpenMP thread only adds synchronisation (transformers too).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _hf_model(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def _trim_at_eos(ids, eos):
    out = []
    for i in ids:
        out.append(i)
        if i in eos:
            break
    return out


def _hf_greedy(hf, prompts_ids, eos, pad):
    """transformers' greedy generate, batched with left padding; new ids per row, cut after the first EOS."""
    width = max(len(p) for p in prompts_ids)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=pad, eos_token_id=eos)
    return [_trim_at_eos(row[width:].tolist(), eos) for row in out]


def _ours(engine, prompts_ids, **kw):
    out = [[] for _ in prompts_ids]
    reqs = [GenerationRequest(prompt_ids=p, max_tokens=NEW_TOKENS, **kw) for p in prompts_ids]
    for e in engine.generate(reqs):
        out[e.request_index].append(e.token_id)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def family(request, tiny_checkpoint_factory):
    path = tiny_checkpoint_factory(request.param)
    return path, Engine.load(path, dtype="f32"), _hf_model(path)


def test_greedy_equals_transformers_single_and_batched(family):
    path, engine, hf = family
    tok = engine.tokenizer
    prompts_ids = [tok.encode(p) for p in PROMPTS]
    eos = list(tok.eos_token_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for p in prompts_ids[:2]:
        assert _ours(engine, [p]) == _hf_greedy(hf, [p], eos, pad)
    # Batched: different lengths, right-padded on our side, left-padded for transformers.
    assert _ours(engine, prompts_ids) == _hf_greedy(hf, prompts_ids, eos, pad)


def test_streamed_text_is_the_decoded_tokens(family):
    _, engine, _ = family
    events = list(engine.generate(GenerationRequest(prompt=PROMPTS[0], max_tokens=24, ignore_eos=True)))
    ids = [e.token_id for e in events]
    assert "".join(e.text for e in events) == engine.tokenizer.decode(ids)
    assert events[-1].finish_reason == "length" and len(events) == 24


def test_seeded_sampling_is_reproducible(tiny_llama):
    engine = Engine.load(tiny_llama, dtype="f32")
    kw = dict(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, ignore_eos=True)
    a = engine.complete(PROMPTS, seed=5, **kw)
    b = engine.complete(PROMPTS, seed=5, **kw)
    c = engine.complete(PROMPTS, seed=6, **kw)
    assert a == b
    assert a != c
    # A row's draws use its own generator: alone or in a batch it samples the same tokens.
    alone = engine.complete(PROMPTS[:1], seed=5, **kw)
    assert alone[0] == a[0]


def test_stop_string_cuts_the_text(tiny_llama):
    engine = Engine.load(tiny_llama, dtype="f32")
    full = engine.complete([PROMPTS[0]], max_tokens=30, ignore_eos=True)[0]
    if len(full) < 6:
        pytest.skip("the random model produced too little text to cut")
    stop = full[3:6]
    cut = engine.complete([PROMPTS[0]], max_tokens=30, ignore_eos=True, stop=[stop])[0]
    assert cut == full[: full.index(stop)]


def test_chat_uses_the_template(tiny_llama):
    engine = Engine.load(tiny_llama, dtype="f32")
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    via_chat = list(engine.generate(GenerationRequest(messages=messages, max_tokens=8)))
    via_ids = list(engine.generate(GenerationRequest(prompt_ids=ids, max_tokens=8)))
    assert [e.token_id for e in via_chat] == [e.token_id for e in via_ids]
    assert engine.chat([messages], max_tokens=8) == ["".join(e.text for e in via_ids)]


def test_chat_prompt_matches_transformers_template(tiny_llama):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    engine = Engine.load(tiny_llama, dtype="f32")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):  # newer transformers return a BatchEncoding
        expected = expected["input_ids"]
    from fleetlm.engine.generate import encode_request

    assert encode_request(engine.tokenizer, GenerationRequest(messages=messages)) == list(expected)


def test_bf16_loads_and_tracks_f32(tiny_llama):
    f32 = Engine.load(tiny_llama, dtype="f32")
    bf16 = Engine.load(tiny_llama, dtype="bf16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    a = _ours(f32, [f32.tokenizer.encode(PROMPTS[1])])[0]
    b = _ours(bf16, [bf16.tokenizer.encode(PROMPTS[1])])[0]
    assert a[0] == b[0]  # the first greedy token survives the rounding; later ones may drift


def test_unknown_dtype_is_a_typed_error(tiny_llama):
    with pytest.raises(UnsupportedDtypeError):
        Engine.load(tiny_llama, dtype="fp8")


def test_quantized_dtype_loads_or_says_why(tiny_llama):
    scheme = "int8"
    assert scheme in DTYPES
    try:
        import fleetlm.engine.quant  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(UnsupportedDtypeError):
            Engine.load(tiny_llama, dtype=scheme)
        return
    engine = Engine.load(tiny_llama, dtype=scheme)
    out = engine.complete([PROMPTS[0]], max_tokens=4, ignore_eos=True)
    assert isinstance(out[0], str)
    assert engine.dtype == scheme


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        Engine.load(tmp_path / "nope")
    with pytest.raises(CheckpointError):
        Engine.load(tmp_path)


def test_generate_accepts_a_single_request_and_records_stats(tiny_llama):
    engine = Engine.load(tiny_llama, dtype="f32")
    events = list(engine.generate(GenerationRequest(prompt=PROMPTS[1], max_tokens=6, ignore_eos=True)))
    assert len(events) == 6
    s = engine.last_stats
    assert s.prompt_tokens == len(engine.tokenizer.encode(PROMPTS[1]))
    assert s.decode_tokens == 5 and s.decode_tokens_per_second > 0


@pytest.mark.parametrize("dtype", ["f32", "int8"])
def test_compiled_decode_step_matches_eager_and_does_not_recompile(tiny_llama, dtype):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = Engine.load(tiny_llama, dtype=dtype)
    compiled = Engine.load(tiny_llama, dtype=dtype, compile=True)
    prompts = [eager.tokenizer.encode(p) for p in PROMPTS]
    expected = _ours(eager, prompts, ignore_eos=True)
    assert _ours(compiled, prompts, ignore_eos=True) == expected  # batched, rows of different lengths
    # one graph a step: a break would compile each layer as its own frame (up to the recompile limit)
    assert not counters["graph_break"], dict(counters["graph_break"])

    # another call of another length reuses the caches and the compiled code: no new graphs
    def same_length(n, max_tokens):  # rows at one position: the unmasked attention variant
        return [GenerationRequest(prompt_ids=p[:n], max_tokens=max_tokens, ignore_eos=True) for p in prompts]

    assert compiled._collect(same_length(1, 5)) == eager._collect(same_length(1, 5))
    graphs = counters["stats"]["unique_graphs"]
    assert compiled._collect(same_length(2, 9)) == eager._collect(same_length(2, 9))
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_cache_lives_in_the_fleet_home(tmp_path, monkeypatch):
    from fleetlm.engine.compiled import COMPILE_CACHE, compile_cache_dir, use_compile_cache

    monkeypatch.setenv("FLEET_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compile_cache_dir() == tmp_path / COMPILE_CACHE
    assert use_compile_cache() == tmp_path / COMPILE_CACHE and (tmp_path / COMPILE_CACHE).is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / COMPILE_CACHE)  # where Inductor looks
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what Inductor sets at first use
    assert compile_cache_dir() == tmp_path / COMPILE_CACHE
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # a user's choice wins
    assert compile_cache_dir() == tmp_path / "mine"


def test_batch_buckets_are_powers_of_two_within_the_cache():
    from fleetlm.engine.compiled import batch_bucket

    assert [batch_bucket(b, 16) for b in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert batch_bucket(3, 3) == 3 and batch_bucket(6, 7) == 7  # never past the cache's rows


def test_compiling_happens_at_load_and_is_reported_apart(tiny_llama):
    engine = Engine.load(tiny_llama, dtype="f32", compile=True)
    assert engine.compile_seconds > 0  # compiled at load (warm_up), not in the first request
    start = time.perf_counter()
    events = list(engine.generate(GenerationRequest(prompt=PROMPTS[0], max_tokens=4, ignore_eos=True)))
    assert len(events) == 4 and time.perf_counter() - start < engine.compile_seconds
    assert Engine.load(tiny_llama, dtype="f32").compile_seconds == 0.0
