"""POST /v1/embeddings: built-in MiniLM and a local decoder, through the official openai client."""

import asyncio

import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.engine import Engine, GenerationError
from fleetlm.model import SHIPPED_TINY_MODEL
from fleetlm.route.features import Embedder
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import build_backends
from fleetlm.serve.embeddings import BUILTIN_EMBEDDING_MODEL, encode_base64, shared_minilm
from fleetlm.serve.protocol import EmbeddingRequest, parse_request
from fleetlm.serve.store import UsageStore

MINILM = BUILTIN_EMBEDDING_MODEL


@pytest.fixture(scope="module")
def minilm():
    return shared_minilm().load()  # the process-wide copy: loaded once for every test that needs it


@pytest.fixture(scope="module")
def served(tmp_path_factory, minilm):
    cfg = parse_config(
        {
            "models": {
                "tiny": {"path": str(SHIPPED_TINY_MODEL), "dtype": "f32", "price": {"input": 2.0}},
            }
        }
    )
    db = tmp_path_factory.mktemp("emb") / "u.db"
    store = UsageStore(f"sqlite:///{db}")
    backends = build_backends(cfg)
    with TestClient(create_app(cfg, store, backends)) as http:
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0
        )
        yield client, store, backends["tiny"]


def test_minilm_matches_the_routers_embedder_and_caches(minilm, tmp_path):
    texts = ["What is 2 + 2?", "Name the capital of France.", "What is 2 + 2?"]
    vecs, counts = minilm.encode(texts)
    ref = Embedder(cache_dir=tmp_path).encode_uncached(texts)
    # the router was fit on Embedder's vectors: the gateway must feed it the same ones (up to float rounding:
    # two loaded copies of the model may pick different CPU kernels, ~1e-3 per component)
    assert ((vecs * ref).sum(1) > 0.9999).all()
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert counts[0] == counts[2] > 0 and np.array_equal(vecs[0], vecs[2])
    hits = minilm.hits
    again, _ = minilm.encode(["Name the capital of France."])
    assert minilm.hits == hits + 1 and np.array_equal(again[0], vecs[1])


def test_openai_client_gets_minilm_embeddings_float_and_base64(served, minilm):
    client, store, _ = served
    assert MINILM in [m.id for m in client.models.list().data]
    texts = ["a cat sat on the mat", "a kitten sat on a rug", "quarterly tax filing deadline"]
    # the client asks for base64 unless told otherwise and decodes it; ask for floats too
    b64 = client.embeddings.create(model=MINILM, input=texts)
    flt = client.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    a = np.array([d.embedding for d in b64.data])
    b = np.array([d.embedding for d in flt.data])
    assert a.shape == (3, 384) and np.allclose(a, b, atol=1e-6)
    assert np.allclose(a, minilm.encode(texts)[0], atol=1e-6)
    assert a[0] @ a[1] > a[0] @ a[2] + 0.2  # the two sentences about cats are the close pair
    assert b64.usage.prompt_tokens == sum(minilm.encode(texts)[1]) and b64.model == MINILM
    row = store.requests()[-1]
    assert row["model_used"] == MINILM and row["status"] == 200 and row["cost_usd"] == 0.0


def test_token_id_inputs_embed_like_their_text(served, minilm):
    client, _, _ = served
    text = "hello world"
    ids = minilm._model().tokenizer(text, add_special_tokens=False)["input_ids"]
    one = client.embeddings.create(model=MINILM, input=ids, encoding_format="float")
    many = client.embeddings.create(model=MINILM, input=[ids, ids[:1]], encoding_format="float")
    ref = minilm.encode([text])[0][0]
    assert np.allclose(one.data[0].embedding, ref, atol=1e-5)
    assert np.allclose(many.data[0].embedding, ref, atol=1e-5) and len(many.data) == 2
    assert one.usage.prompt_tokens == len(ids) and many.usage.prompt_tokens == len(ids) + 1


def test_local_model_embeds_with_its_decoder(served):
    client, store, backend = served
    r = client.embeddings.create(model="tiny", input=["hello there", "general kenobi"])
    vecs = np.array([d.embedding for d in r.data])
    hidden = backend.engine.model.config.hidden_size
    assert vecs.shape == (2, hidden) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    ids = [backend.engine.tokenizer.encode(t) for t in ["hello there", "general kenobi"]]
    assert r.usage.prompt_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model="tiny", input=ids, encoding_format="float")
    assert np.allclose([d.embedding for d in by_ids.data], vecs, atol=1e-5)
    # priced like any prompt: $2 per million input tokens
    assert store.requests()[-1]["cost_usd"] == pytest.approx(2.0 * sum(map(len, ids)) / 1e6)


def test_engine_embed_is_the_mean_pooled_final_hidden_state():
    engine = Engine.load(SHIPPED_TINY_MODEL, dtype="f32")
    texts = ["one", "a somewhat longer input of several words"]
    vecs, counts = engine.embed(texts)
    captured = {}
    hook = engine.model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    try:
        for text, vec in zip(texts, vecs, strict=True):
            ids = engine.tokenizer.encode(text)
            with torch.no_grad():
                engine.model(torch.tensor([ids]))  # the model's own forward, one input at a time
            ref = torch.nn.functional.normalize(captured["h"].float().mean(1), dim=-1)[0]
            assert torch.allclose(vec, ref, atol=1e-5)  # padding in the batch changed nothing
    finally:
        hook.remove()
    assert counts == [len(engine.tokenizer.encode(t)) for t in texts]
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.embed([[10**9]])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(model=MINILM, input="x", dimensions=16), "does not support dimensions"),
        (dict(model=MINILM, input=""), "must not be empty"),
        (dict(model=MINILM, input=[99_999_999]), "outside the vocabulary"),
        (dict(model=MINILM, input="word " * 400), "takes at most"),
        (dict(model=MINILM, input=["a"] * 2049), "at most 2048"),
        (dict(model="tiny", input="x", dimensions=7), "not supported"),
        (dict(model="tiny", input=[[5, 10**9]]), "outside the vocabulary"),
        (dict(model="nope", input="x"), "does not exist"),
    ],
)
def test_bad_embedding_requests_are_4xx(served, kwargs, fragment):
    client, _, _ = served
    with pytest.raises(openai.APIStatusError) as exc:
        client.embeddings.create(**kwargs)
    assert 400 <= exc.value.status_code < 500 and fragment in exc.value.message


def test_native_dimensions_is_accepted_and_chat_with_an_embedding_model_is_400(served):
    client, _, _ = served
    r = client.embeddings.create(model=MINILM, input="x", dimensions=384, encoding_format="float")
    assert len(r.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=MINILM, messages=[{"role": "user", "content": "hi"}])


def test_input_shapes_parse_and_base64_is_little_endian_float32():
    def parse(value):
        return parse_request(EmbeddingRequest, f'{{"model": "m", "input": {value}}}'.encode()).items()

    assert parse('"a"') == ["a"] and parse('["a", "b"]') == ["a", "b"]
    assert parse("[1, 2]") == [[1, 2]] and parse("[[1], [2, 3]]") == [[1], [2, 3]]
    for bad in ('["a", 1]', "[[1], []]", "[-1]", "[true]", "[]", "{}", "[[1], ['a']]".replace("'", '"')):
        with pytest.raises(Exception, match="input"):
            parse(bad)
    v = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    assert np.array_equal(np.frombuffer(__import__("base64").b64decode(encode_base64(v)), dtype="<f4"), v)


def test_local_backend_embed_runs_beside_generation(served):
    """An embed call while the decode thread works: both answer (no shared cache state is touched)."""
    _, _, backend = served
    from fleetlm.serve.protocol import ChatCompletionRequest

    async def both():
        chat = ChatCompletionRequest(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
        )
        emb = EmbeddingRequest(model="tiny", input=["a", "b", "c"])
        return await asyncio.gather(backend.chat(chat), backend.embed(emb))

    gen, emb = asyncio.run(both())
    assert gen.completion_tokens >= 1 and len(emb.vectors) == 3


def test_concurrent_callers_share_forwards_and_get_their_own_vectors(minilm, monkeypatch):
    import threading
    import time

    texts = [f"question number {i} about the fleet" for i in range(12)]
    alone = {t: minilm._encode_texts([t], True)[0][0] for t in texts}  # reference, no cache involved
    encode = minilm._encode_texts

    def slow_encode(batch, truncate):
        time.sleep(0.05)  # a forward long enough for the other callers to queue behind the leader
        return encode(batch, truncate)

    # Without it a forward of one short text can end before the next thread arrives (seen in CI: 12 of 12).
    monkeypatch.setattr(minilm, "_encode_texts", slow_encode)
    before = minilm.forwards
    got: dict[str, np.ndarray] = {}
    start = threading.Barrier(len(texts))

    def ask(t: str) -> None:
        start.wait()
        got[t] = minilm([t])[0]

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads)
    assert set(got) == set(texts)
    for t in texts:
        assert float(got[t] @ alone[t]) > 0.9999
    assert minilm.forwards - before < len(texts)  # some callers were batched together
