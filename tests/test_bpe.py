import json
import os
import random

import pytest

from fleetlm.errors import ConfigError
from fleetlm.train.bpe import CHAT_TEMPLATE, train_bpe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXTS = ["the quick brown fox jumps over the lazy dog", "12+34=46", "hello world, hello fleet"] * 20
# enough distinct words for every requested merge to exist
_rng = random.Random(0)
WORDS = ["".join(_rng.choice("abcdefgh") for _ in range(5)) for _ in range(900)]
CORPUS = TEXTS + [" ".join(WORDS[i : i + 30]) for i in range(0, 900, 30)]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "héllo wörld 😀"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_bpe(CORPUS, 320, tmp_path_factory.mktemp("bpe"))


def test_files_and_vocab(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    assert len(data["model"]["vocab"]) == 320  # 256 bytes + merges + specials, as asked
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["eos_token"] == "<|im_end|>"


def test_loads_in_transformers_and_fleetlm_with_same_ids(tok_dir):
    from transformers import AutoTokenizer

    from fleetlm.model.tokenizer import Tokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    ours = Tokenizer.from_dir(tok_dir)
    for text in TEXTS[:3] + ["unseen ünïcode 字 text", "<|im_start|>user\nhi<|im_end|>"]:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids, skip_special_tokens=False) == text == hf.decode(ids)
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True) == rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    assert hf.eos_token_id in ours.eos_token_ids and ours.pad_token_id == hf.pad_token_id
    # special tokens are single ids, never split into bytes
    assert len(hf("<|im_end|>")["input_ids"]) == 1


def test_merges_compress_the_training_text(tok_dir):
    from tokenizers import Tokenizer as Raw

    raw = Raw.from_file(str(tok_dir / "tokenizer.json"))
    assert len(raw.encode(TEXTS[0]).ids) < 0.6 * len(TEXTS[0].encode())


def test_too_small_vocab_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        train_bpe(TEXTS, 100, tmp_path)


def test_individual_digits_split_every_number_into_digits(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer

    texts = ["12345 + 678 = 13023", "99 * 99 = 9801"] * 50
    out = train_bpe(texts, 300, tmp_path / "tok", individual_digits=True)
    tok = RawTokenizer.from_file(str(out / "tokenizer.json"))
    pieces = tok.encode("31415 + 9").tokens
    digits = [p for p in pieces if p.strip("Ġ").isdigit()]
    assert [p.strip("Ġ") for p in digits] == list("31415") + ["9"]
    assert tok.decode(tok.encode("31415 + 9").ids) == "31415 + 9"
