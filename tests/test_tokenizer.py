import json
import shutil
from datetime import datetime

import pytest

from fleetlm.errors import CheckpointError
from fleetlm.model import SHIPPED_TINY_MODEL, ChatTemplateError, Tokenizer

TEXTS = [
    "Hello world",
    "The fleet routes each request.",
    "  leading spaces and\ttabs\nnew lines  ",
    "Grüße, 東京, Привет! 3.14 + 2 = 5.14",
    "<|eot_id|> special text <|im_end|>",
    "",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city, °C",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
            ],
        },
        {"role": "tool", "content": "21 degrees"},
    ],
]


def hf_tokenizer(path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_encode_decode_match_transformers(tiny_tokenizer_dir, style):
    path, ids = tiny_tokenizer_dir(style)
    ours, ref = Tokenizer.from_dir(path), hf_tokenizer(path)
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
        full = ours.encode(text)
        assert ours.decode(full) == ref.decode(full, skip_special_tokens=True)
        assert ours.decode(full, skip_special_tokens=False) == ref.decode(full)
    assert ours.encode_batch(TEXTS[:3]) == [ref(t)["input_ids"] for t in TEXTS[:3]]
    # llama-style post-processing prepends bos; ChatML adds nothing
    if style == "llama3":
        assert ours.encode("Hi")[0] == ours.bos_token_id == ref.bos_token_id
    else:
        assert ours.bos_token_id is None and ours.encode("Hi") == ours.encode("Hi", add_special_tokens=False)
    assert ours.eos_token_ids[0] == ref.eos_token_id
    assert ours.decode(ours.encode(TEXTS[3])) == TEXTS[3]
    assert 300 <= ours.vocab_size <= 1000


@pytest.mark.parametrize("style", ["llama3", "chatml"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_chat_template_matches_transformers(tiny_tokenizer_dir, style, conv, gen_prompt, tools):
    path, _ = tiny_tokenizer_dir(style)
    ours, ref = Tokenizer.from_dir(path), hf_tokenizer(path)
    messages = CONVERSATIONS[conv]
    extra = {"date_string": "01 Jan 2026"} if conv == 1 else {}
    got = ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, tools=tools, **extra)
    want = ref.apply_chat_template(
        messages, add_generation_prompt=gen_prompt, tools=tools, tokenize=False, **extra
    )
    assert got == want
    if tools:
        assert "get_weather" in got and "°C" in got  # tojson keeps non-ASCII as is
    assert (
        got.endswith("assistant\n" if style == "chatml" else "assistant<|end_header_id|>\n\n") == gen_prompt
    )


def test_template_helpers(tiny_tokenizer_dir):
    path, _ = tiny_tokenizer_dir("llama3")
    tok = Tokenizer.from_dir(path)
    # strftime_now fills the date when the caller gives none
    text = tok.apply_chat_template(CONVERSATIONS[0], tools=TOOLS)
    assert datetime.now().strftime("%d %b %Y") in text
    with pytest.raises(ChatTemplateError, match="unknown role: narrator"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}])
    tok.chat_template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}{% endfor %}"
    )
    assert (
        tok.apply_chat_template([{"role": "user", "content": "<é>"}, {"role": "user", "content": "b"}])
        == '"<é>"'
    )
    tok.chat_template = {"default": "D{{ messages | length }}", "tool_use": "T{{ tools | length }}"}
    assert tok.apply_chat_template(CONVERSATIONS[0]) == "D1"
    assert tok.apply_chat_template(CONVERSATIONS[0], tools=TOOLS) == "T1"
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])
    tok.chat_template = "{% if %}"
    with pytest.raises(ChatTemplateError, match="does not parse"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_save_and_reload(tiny_tokenizer_dir, tmp_path):
    path, _ = tiny_tokenizer_dir("chatml")
    tok = Tokenizer.from_dir(path)
    tok.save(tmp_path / "t")
    again = Tokenizer.from_dir(tmp_path / "t")
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert again.apply_chat_template(CONVERSATIONS[1]) == tok.apply_chat_template(CONVERSATIONS[1])
    assert (again.pad_token_id, again.eos_token_ids) == (tok.pad_token_id, tok.eos_token_ids)
    # named templates (a list in tokenizer_config.json) and a chat_template.jinja file are read too
    cfg = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "X"}]
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(tmp_path / "t").apply_chat_template(CONVERSATIONS[0]) == "X"
    del cfg["chat_template"]
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "t" / "chat_template.jinja").write_text("J{{ add_generation_prompt }}")
    assert Tokenizer.from_dir(tmp_path / "t").apply_chat_template(CONVERSATIONS[0]) == "JTrue"


def test_shipped_tokenizer_and_errors(tmp_path):
    tok = Tokenizer.from_dir(SHIPPED_TINY_MODEL)
    assert tok.eos_token_ids[:2] == [tok.token_id("<|eot_id|>"), tok.token_id("<|end_of_text|>")]
    assert tok.pad_token_id == tok.eos_token_ids[0]  # no pad token: eos stands in
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_continue_final_message_and_none_fields_match_transformers(tiny_tokenizer_dir, style):
    path, _ = tiny_tokenizer_dir(style)
    ours, ref = Tokenizer.from_dir(path), hf_tokenizer(path)
    partial = [*CONVERSATIONS[1][:2], {"role": "assistant", "content": "The answer is "}]
    got = ours.apply_chat_template(partial, continue_final_message=True)
    want = ref.apply_chat_template(partial, continue_final_message=True, tokenize=False)
    assert got == want and got.endswith("The answer is" if style == "llama3" else "The answer is ")
    # OpenAI clients send content=None next to tool_calls; the key is dropped, as transformers does
    openai_style = [dict(m, content=None) if m.get("tool_calls") else m for m in CONVERSATIONS[2]]
    got = ours.apply_chat_template(openai_style, tools=TOOLS)
    assert got == ref.apply_chat_template(
        openai_style, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )


def test_reasoning_aliases_namespace_and_dict(tiny_tokenizer_dir):
    path, _ = tiny_tokenizer_dir("chatml")
    ours, ref = Tokenizer.from_dir(path), hf_tokenizer(path)
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "[{{ m.reasoning_content | default('-') }}|{{ m.thinking | default('-') }}]{% endfor %}"
        "{{ ns.n }}{{ dict.fromkeys(['a', 'b'], 1) | tojson }}{{ dict(x=eos_token) | tojson }}"
    )
    messages = [
        {"role": "assistant", "content": "ok", "reasoning": "because"},
        {"role": "user", "content": "hi"},
    ]
    ours.chat_template = ref.chat_template = template
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False)
    assert "[because|because]" in ours.apply_chat_template(messages)
    ours.chat_template = "{% set ns = namespace(_x=1) %}"
    with pytest.raises(ChatTemplateError):
        ours.apply_chat_template(messages)
    with pytest.raises(ChatTemplateError, match="empty"):
        ours.apply_chat_template([])


@pytest.mark.parametrize(
    "style,flags", [("llama3", {"add_bos_token": False}), ("chatml", {"add_eos_token": True})]
)
def test_add_bos_eos_flags_handled_like_transformers(tiny_tokenizer_dir, tmp_path, style, flags):
    path, _ = tiny_tokenizer_dir(style)
    shutil.copyfile(path / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, **flags}))
    ours, ref = Tokenizer.from_dir(tmp_path), hf_tokenizer(tmp_path)
    for text in TEXTS[:4]:
        assert ours.encode(text) == ref(text)["input_ids"]
    # transformers 5 keeps tokenizer.json's post-processor whatever these flags say; so do we
    assert ours.encode("Hi") == Tokenizer.from_dir(path).encode("Hi")
