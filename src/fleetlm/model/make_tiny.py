"""Make tiny models: a byte-level BPE tokenizer trained on a built-in text, chat templates, and the shipped
random-weight tiny Llama (`python -m fleetlm.model.make_tiny [OUT_DIR]`, fixed seed).

Tests use the same tokenizer builder for their tiny checkpoints, so shipped model and fixtures agree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from fleetlm.model.checkpoint import save_checkpoint
from fleetlm.model.config import ModelConfig
from fleetlm.model.decoder import Transformer

SAMPLE_TEXT = """\
The fleet is a set of language models, each with a price and a quality. A router sends every request to the
cheapest model that is good enough, and the usage log tells us which model answered, how long it took, and
what it cost. When the big model answers the same kind of question again and again, we distill its answers
into a small expert, compress it, and add it to the fleet. Then the router is fitted again and the bill drops.
User: What is the capital of France?
Assistant: The capital of France is Paris.
User: Add 17 and 25.
Assistant: 17 + 25 = 42.
User: Write a haiku about the sea.
Assistant: Grey waves fold and break, / salt wind carries the gull's cry, / the tide keeps its time.
def add(a: int, b: int) -> int:
    return a + b

for i in range(10):
    print(i, i * i)
{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.718 -1 42 2024 1e-4.
A quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly. Pack my box with five dozen
liquor jugs. How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Large language models predict the next token. A tokenizer turns text into tokens, the model turns tokens into
probabilities, and a sampler picks the next token: greedy, with a temperature, top-k or top-p.
The key and value cache keeps what the model has already computed, so each new token costs one step.
Quantization stores weights in eight or four bits, which makes decoding faster because it reads less memory.
Bonjour, ça va? Grüße aus München! ¿Dónde está la biblioteca? 東京は日本の首都です。 Привет, мир!
Questions, answers, summaries, translations, classifications, extractions: each task has a checker.
"""

# Llama-3 style chat markup; a system turn (with tool descriptions when tools are given), raise_exception on
# unknown roles, and a loop control, so that the template exercises the whole jinja2 environment.
LLAMA3_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if system_message or tools is not none %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
    {%- if tools is not none %}
        {{- 'Today Date: ' + date_string + '\\n\\n' }}
        {{- 'You may call a function. Reply with JSON {"name": name, "parameters": arguments}.\\n\\n' }}
        {%- for tool in tools %}
            {%- if tool is none %}{% continue %}{% endif %}
            {{- tool | tojson(indent=4) }}
            {{- '\\n\\n' }}
        {%- endfor %}
    {%- endif %}
    {{- system_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'tool', 'ipython'] %}
        {{- raise_exception('unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if message['role'] == 'assistant' and message.tool_calls is defined and message.tool_calls %}
        {%- for call in message.tool_calls %}
            {%- set f = call.function if call.function is defined else call %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
            {{- '{"name": "' + f.name + '", "parameters": ' + f.arguments | tojson + '}<|eot_id|>' }}
        {%- endfor %}
    {%- elif message['role'] in ['tool', 'ipython'] %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}
        {{- (message.content | tojson if message.content is mapping else message.content) + '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# ChatML (Qwen2 style): default system prompt, tools listed inside <tools>, tool calls inside <tool_call>.
CHATML_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- '\\n\\n# Tools\\n\\nYou may call one or more functions.\\n\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nReturn each call as JSON inside <tool_call></tool_call> tags.<|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
        {%- continue %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for call in message.tool_calls %}
            {%- set f = call.function if call.function is defined else call %}
            {{- '\\n<tool_call>\\n{"name": "' + f.name + '", "arguments": ' }}
            {{- f.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# style -> (special tokens in id order, bos, eos of a chat turn, pad, eos ids for the model config, template)
STYLES = {
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
        ["<|eot_id|>", "<|end_of_text|>"],
        LLAMA3_CHAT_TEMPLATE,
    ),
    "chatml": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        "<|endoftext|>",
        ["<|im_end|>", "<|endoftext|>"],
        CHATML_CHAT_TEMPLATE,
    ),
}


def train_tokenizer(style: str = "llama3", vocab_size: int = 512, text: str = SAMPLE_TEXT) -> _Backend:
    """A byte-level BPE tokenizer; llama3 style prepends bos in its post-processor, chatml adds nothing."""
    specials, bos = STYLES[style][0], STYLES[style][1]
    tok = _Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    if bos is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    return tok


def write_tokenizer(out_dir: str | Path, style: str = "llama3", vocab_size: int = 512) -> dict:
    """Write tokenizer.json + tokenizer_config.json (with the style's chat template); return token ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials, bos, eos, pad, model_eos, template = STYLES[style]
    tok = train_tokenizer(style, vocab_size)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in specials
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": tok.token_to_id(bos or specials[0]),
        "eos_token_ids": [tok.token_to_id(t) for t in model_eos],
        "pad_token_id": None if pad is None else tok.token_to_id(pad),
    }


def make_tiny_llama(out_dir: str | Path, seed: int = 0) -> Path:
    """The shipped tiny Llama: random weights (std 0.1 so that logits are not all near zero), float32."""
    out = Path(out_dir)
    ids = write_tokenizer(out, "llama3", vocab_size=512)
    config = ModelConfig(
        arch="llama",
        vocab_size=ids["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=ids["bos_token_id"],
        eos_token_ids=ids["eos_token_ids"],
    )
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return save_checkpoint(model, out)


def main() -> None:
    default = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(default))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_tiny_llama(args.out_dir, seed=args.seed)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
