"""Our engine on the real SmolLM2-135M GGUF equals llama.cpp and transformers on the same file.

Token ids on 1,000+ varied strings (llama.cpp's and transformers' GGUF tokenizers), the chat template as
transformers renders it, f32 logits and greedy runs as transformers' (which dequantizes the file too), and
top-1 agreement with llama.cpp (which multiplies with quantized activations). Qwen2.5-Coder-0.5B's tokenizer
and template are checked too where that model is already installed (never downloaded here).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")

from fleetlm.engine import Engine, GenerationRequest  # noqa: E402 - after the skips
from fleetlm.model.gguf import GGUFFile, _pre_tokenizer, gguf_tokenizer  # noqa: E402

QWEN = "qwen2.5-coder-0.5b-instruct"

CODE = [
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "const x = {a: 1, 'b': [2, 3]};\nconsole.log(`x=${x.a}`);",
    '{"name": "fleet", "size": 135000000, "ok": true, "tags": ["a", "b"]}',
    '<div class="box">\n  <p>Hello &amp; welcome</p>\n</div>',
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "import numpy as np\nx = np.arange(10).reshape(2, 5)  # shape (2, 5)\n",
    "if __name__ == '__main__':\n    main()\n",
    'fn main() { println!("{}", 1u64 << 40); }',
    '#include <stdio.h>\nint main(void){printf("%d\\n", 42);}',
    "lambda x: x**2 if x>0 else -x",
    "    \n\t\t# comment with trailing spaces   \n",
    "a_b_c = f'{value!r:>10}'",
    "$ echo \"$HOME\" && ls -la | grep -v '^d'",
    "x += 1; y -= 2; z *= 3; w /= 4; v %= 5; u **= 6; t //= 7",
]
SCRIPTS = [
    "Café déjà vu, naïve façade, Ærøskøbing, Œuvre, straße",
    "Ελληνικά: Καλημέρα κόσμε",
    "Русский текст: Привет, мир! Ёжик.",
    "العربية: مرحبا بالعالم",
    "עברית: שלום עולם",
    "हिन्दी: नमस्ते दुनिया",
    "ไทย: สวัสดีชาวโลก",
    "中文：你好，世界！我们在测试分词器。",
    "日本語：こんにちは世界、カタカナ、ひらがな",
    "한국어: 안녕하세요 세계",
    "Tiếng Việt: Xin chào thế giới",
    "ქართული ენა",
    "Հայերեն",
    "አማርኛ",
    "e\u0301 a\u0308 n\u0303 (combining)",
    "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∑∫∂√∞≠≤≥",
    "\u200bzero\u200bwidth\u200dspace\ufeff",
    "Ⅻ ⅻ ½ ¾ ² ³ ١٢٣ ४५६ 〇一二三",
]
EMOJI = [
    "😀",
    "👍🏽",
    "👨‍👩‍👧‍👦",
    "🧑🏿‍💻",
    "🏳️‍🌈",
    "🇫🇷🇯🇵",
    "1️⃣",
    "❤️‍🔥",
    "🙋🏻‍♀️",
    "🤷‍♂️",
    "👩🏾‍🤝‍👩🏼",
    "🐍🦀☕",
    "✨🎉🚀",
    "⌚️",
    "©️®️™️",
]
SPACES = [
    " ",
    "  ",
    "   ",
    "\t",
    "\t\t",
    "\n",
    "\n\n",
    "\r\n",
    "\r\n\r\n",
    " \n ",
    "\n\t",
    "    \n",
    "\u00a0",
    "\u3000",
    " \t \n",
]
SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>user\n",
    "<|im_",
    "|>",
    "<|endof",
    "<|im_start|><|im_end|>",
]
WORDS = [
    "the",
    "The",
    "THE",
    "hello",
    "world",
    "don't",
    "I'LL",
    "we're",
    "it's",
    "you've",
    "they'd",
    "isn't",
    "Fleet",
    "tokenizer",
    "antidisestablishmentarianism",
    "x",
    "a",
    "I",
    "GPT",
    "llama.cpp",
    "e-mail",
    "O'Neil",
    "naïve",
    "résumé",
    "well-known",
    "C++",
    "#hashtag",
    "@user",
    "http://x.io/a?b=1",
]


def _number(rng: random.Random) -> str:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.choice([1, 2, 3, 4, 5, 7, 12, 20, 40])))
    return rng.choice(
        [
            digits,
            f"{digits}.{rng.randrange(1000)}",
            f"-{digits}",
            f"{int(digits):,}",
            f"+1 ({digits[:3]}) {digits[3:]}",
        ]
    )


def varied_strings(n: int = 1200, seed: int = 0) -> list[str]:
    """Fixed hard cases, then random joins of code, scripts, emoji, whitespace, numbers, special tokens."""
    rng = random.Random(seed)
    out = [
        "",
        " ",
        "  leading",
        "   three leading",
        "trailing   ",
        "\n",
        "\r\n",
        "\t",
        "a",
        " a",
        "Hello world",
        " Hello world",
        "1234567890",
        "3.14159265358979",
        "12345678901234567890123",
        *CODE,
        *SCRIPTS,
        *EMOJI,
        *SPECIAL,
        *WORDS,
        *[f"{s}hi{s}" for s in SPACES],
        *[f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{w}<|im_end|>\n" for w in WORDS[:8]],
    ]
    pools = [CODE, SCRIPTS, EMOJI, SPACES, SPECIAL, WORDS, WORDS, WORDS, SPACES]
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 8)):
            pick = rng.randrange(len(pools) + 1)
            parts.append(_number(rng) if pick == len(pools) else rng.choice(pools[pick]))
            if rng.random() < 0.5:
                parts.append(rng.choice([" ", "", "", "\n", "  ", ", ", ". "]))
        out.append("".join(parts))
    return out


TEXTS = varied_strings()
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            },
        },
    },
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Write a haiku about ünïcödé 🚀"},
    ],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c\n\nd"},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "user", "content": "thanks"},
    ],
]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a land of 1234 dragons,",
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
PASSAGE = (
    "<|im_start|>user\nHow do I read a CSV file in Python and sum one column?<|im_end|>\n"
    "<|im_start|>assistant\nYou can use the csv module from the standard library. Open the file, wrap it "
    "in a DictReader, and add up the values of the column you want, converting each one to a number "
    "first:\n\n```python\nimport csv\n\ndef column_total(path, column):\n    total = 0.0\n"
    "    with open(path, newline='') as f:\n        for row in csv.DictReader(f):\n"
    "            total += float(row[column])\n    return total\n\n"
    "print(column_total('sales.csv', 'amount'))\n```\n\nIf the file is large, this reads it one row "
    "at a time, so memory stays small. For quick analysis, pandas does the same in one line: "
    "`pd.read_csv('sales.csv')['amount'].sum()`. Watch out for empty cells, thousands separators such "
    "as 1,250.00, and files saved with a different encoding; pass encoding='utf-8-sig' when a "
    "spreadsheet program wrote a byte order mark at the start. Finally, remember that floating point "
    "sums can drift by a tiny amount, so round the result (for example to two decimals) before you "
    "show it to a user or compare it with another total. If you need exact cents, use the decimal "
    "module instead of float.<|im_end|>\n"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on the shared 2-core machine (load average 14) two OpenMP threads waiting on each other
    made the greedy test take 380 s against 83 s on one thread; a 135M model gains little from a second."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model_path(name: str, smollm2_gguf: Path) -> Path:
    if name == "smollm2":
        return smollm2_gguf
    from fleetlm.catalog import installed_path

    path = installed_path(QWEN)
    if path is None:
        pytest.skip(f"{QWEN} is not installed (fleet models pull {QWEN}); the suite never downloads it")
    return Path(path)


@pytest.fixture(scope="module", params=["smollm2", "qwen0.5b"])
def tokenizers_of(request, smollm2_gguf):
    """(name, path, ours, llama.cpp vocab-only model, transformers' tokenizer) for one GGUF file."""
    path = _model_path(request.param, smollm2_gguf)
    ours = gguf_tokenizer(GGUFFile(path))
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    yield request.param, path, ours, llm, hf
    llm.close()


def test_token_ids_equal_llama_cpp_on_1000_varied_strings(tokenizers_of):
    _, _, ours, llm, _ = tokenizers_of
    assert len(TEXTS) >= 1000 and len(set(TEXTS)) > 900
    differ = [t for t in TEXTS if ours.encode(t) != llm.tokenize(t.encode(), add_bos=True, special=True)]
    assert differ == []


def test_decoding_gives_back_the_text_as_llama_cpp_does(tokenizers_of):
    _, _, ours, llm, _ = tokenizers_of
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert llm.detokenize(ids, special=True).decode() == text
    im_end = ours.token_id("<|im_end|>")
    assert ours.decode([*ours.encode("hi"), im_end]) == "hi"  # special tokens skipped by default


def test_token_ids_equal_transformers_gguf_tokenizer(tokenizers_of):
    name, _, ours, _, hf = tokenizers_of
    differ = [t for t in TEXTS if ours.encode(t) != hf(t)["input_ids"]]
    if name == "qwen0.5b":
        assert differ == []
        return
    # transformers has no split for llama.cpp's "smollm" pre-tokenizer (digits one at a time, then GPT-2's
    # regex), so it splits digit runs and the whitespace before them differently from llama.cpp. Every
    # difference has a number in it, and with llama.cpp's split the two tokenizers agree on every string.
    assert all(any(c.isnumeric() for c in t) for t in differ), [
        t for t in differ if not any(map(str.isnumeric, t))
    ]
    hf.backend_tokenizer.pre_tokenizer = _pre_tokenizer("smollm")
    assert [t for t in TEXTS if ours.encode(t) != hf(t)["input_ids"]] == []


def test_special_tokens_and_end_of_generation_match_llama_cpp(tokenizers_of):
    _, _, ours, llm, hf = tokenizers_of
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog = {i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert set(ours.eos_token_ids) == eog
    assert ours.bos_token_id == llama_cpp.llama_vocab_bos(vocab)
    assert (ours.encode("x")[0] == ours.bos_token_id) == bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    assert ours.special_tokens["eos_token"] == hf.eos_token
    assert ours.vocab_size == llama_cpp.llama_vocab_n_tokens(vocab)


def test_chat_template_renders_as_transformers(tokenizers_of):
    name, _, ours, _, hf = tokenizers_of
    for tools in (None, TOOLS):
        for conversation in CONVERSATIONS:
            for gen in (True, False):
                expect = hf.apply_chat_template(
                    conversation, tools=tools, tokenize=False, add_generation_prompt=gen
                )
                assert (
                    ours.apply_chat_template(conversation, tools=tools, add_generation_prompt=gen) == expect
                )
    with_tools = ours.apply_chat_template(CONVERSATIONS[0], tools=TOOLS)
    if name == "qwen0.5b":  # Qwen2.5's template lists the tools in its system turn
        assert "# Tools" in with_tools and '"name": "get_weather"' in with_tools
    else:  # SmolLM2's template has no tools section: they change nothing
        assert with_tools == ours.apply_chat_template(CONVERSATIONS[0])


# ----------------------------------------------------------------------------------------------------
# the weights: SmolLM2 (Q4_1, a Q8_0 embedding) in f32


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    return Engine.load(smollm2_gguf, dtype="f32")


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None  # every run full length, as ignore_eos on our side
    return model


@torch.inference_mode()
def test_f32_logits_equal_transformers_within_1e_3(engine, hf_model):
    for prompt in PROMPTS:
        ids = torch.tensor([engine.tokenizer.encode(prompt)])
        ours, theirs = engine.model(ids)[0], hf_model(ids).logits[0]
        assert ours.shape == theirs.shape
        diff = float((ours - theirs).abs().max())
        assert diff <= 1e-3, (prompt, diff)  # measured: 0.0 (the same dequantized weights, the same ops)


@torch.inference_mode()
def test_greedy_continuations_equal_transformers_token_for_token(engine, hf_model):
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        ours = [
            e.token_id
            for e in engine.generate(
                GenerationRequest(prompt_ids=ids, max_tokens=32, temperature=0.0, ignore_eos=True)
            )
        ]
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=0)[
            0, len(ids) :
        ].tolist()
        assert len(ours) == 32 and ours == theirs, prompt


@torch.inference_mode()
def test_top1_agreement_with_llama_cpp_on_256_teacher_forced_tokens(engine, smollm2_gguf):
    ids = engine.tokenizer.encode(PASSAGE)
    assert len(ids) >= 257
    ids = ids[:257]
    llm = llama_cpp.Llama(
        str(smollm2_gguf), n_ctx=512, n_batch=512, logits_all=True, n_threads=2, verbose=False
    )
    try:
        llm.eval(ids)
        theirs = torch.from_numpy(llm.scores[: len(ids)].copy())
    finally:
        llm.close()
    ours = engine.model(torch.tensor([ids]))[0]
    agreement = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    # measured 98.1% (252 of 257): llama.cpp rounds activations to 8 bits in its quantized matmuls
    assert agreement >= 0.93, agreement
