"""/v1/responses on real models: the shipped tiny model's forced call under the chat path's constrained
decoding, SmolLM2-135M's tool loop and its citation of the right file (both through llama.cpp)."""

import io
import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.store import UsageStore
from rag_fakes import bag_of_words
from responses_fakes import connect

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}, "strict": True}
ADD = {"type": "function", "name": "add",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "required": ["a", "b"]}}


@pytest.mark.parametrize("stream", [False, True])
def test_the_shipped_tiny_model_calls_a_forced_function_that_matches_its_schema(tmp_path, stream):
    """The chat path's constrained decoding on our engine: a named tool_choice always parses and matches."""
    from fleetlm.model import SHIPPED_TINY_MODEL
    from fleetlm.serve.backends import build_backends

    config = parse_config({"models": {"tiny": {"path": str(SHIPPED_TINY_MODEL), "dtype": "f32"}}})
    app = create_app(config, UsageStore(f"sqlite:///{tmp_path / 'fleet.db'}"), build_backends(config))
    with TestClient(app) as tc:
        client = connect(tc)
        ask = dict(model="tiny", input="Add 2 and 40.", tools=[ADD, WEATHER], temperature=1.0,
                   tool_choice={"type": "function", "name": "add"}, max_output_tokens=80)
        if stream:
            with client.responses.stream(**ask) as events:
                kinds = [e.type for e in events]
                r = events.get_final_response()
            assert "response.function_call_arguments.delta" in kinds
        else:
            r = client.responses.create(**ask)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "add" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), ADD["parameters"])


def test_a_real_small_model_cites_the_file_that_answers(tmp_path, smollm2_gguf):
    """SmolLM2-135M through llama.cpp, a two-file store: the citation points at the tides file."""
    pytest.importorskip("llama_cpp")
    from fleetlm.serve.backends import build_backends

    config = parse_config(
        {
            "models": {"smol": {"gguf": str(smollm2_gguf), "engine": "llama_cpp"}},
            "knowledge": {"files_dir": str(tmp_path / "blobs")},
        }
    )
    app = create_app(config, UsageStore(f"sqlite:///{tmp_path / 'fleet.db'}"), build_backends(config))
    app.state.gateway.knowledge_embed = bag_of_words
    with TestClient(app) as tc:
        client = connect(tc)
        texts = {
            "cats.txt": "A cat purrs when it is content and sleeps on the sofa all afternoon.",
            "tides.txt": "Tides rise and fall twice a day because the moon pulls the oceans.",
        }
        ids = {
            n: client.files.create(file=(n, io.BytesIO(t.encode())), purpose="assistants").id
            for n, t in texts.items()
        }
        vs = client.vector_stores.create(name="kb")
        client.vector_stores.file_batches.create_and_poll(
            vector_store_id=vs.id, file_ids=list(ids.values()), poll_interval_ms=50
        )
        r = client.responses.create(
            model="smol",
            input="Why do tides rise and fall?",
            max_output_tokens=40,
            temperature=0,
            tools=[{"type": "file_search", "vector_store_ids": [vs.id]}],
        )
    annotations = r.output[1].content[0].annotations
    assert r.output_text and annotations, r.output_text
    assert annotations[0].file_id == ids["tides.txt"] and annotations[0].filename == "tides.txt"


def test_smollm2_runs_the_tool_loop_over_responses(tmp_path, smollm2_gguf):
    """SmolLM2-135M through llama.cpp: a required call that parses and matches its schema, then its output
    sent back by call_id on the chain and a streamed text answer."""
    pytest.importorskip("llama_cpp")
    from fleetlm.serve.backends import build_backends

    config = parse_config({"models": {"smol": {"gguf": str(smollm2_gguf), "engine": "llama_cpp"}}})
    app = create_app(config, UsageStore(f"sqlite:///{tmp_path / 'fleet.db'}"), build_backends(config))
    with TestClient(app) as tc:
        client = connect(tc)
        r = client.responses.create(model="smol", input="Add 2 and 40.", tools=[ADD], tool_choice="required",
                                    temperature=0, max_output_tokens=60)
        (call,) = [o for o in r.output if o.type == "function_call"]
        assert call.name == "add"
        jsonschema.validate(json.loads(call.arguments), ADD["parameters"])
        with client.responses.stream(model="smol", previous_response_id=r.id, tools=[ADD], tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "42"}],
                                     temperature=0, max_output_tokens=30) as events:
            deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
            final = events.get_final_response()
    assert final.status == "completed" and final.output_text.strip() and "".join(deltas) == final.output_text
    assert final.previous_response_id == r.id
