"""Train a byte-level BPE tokenizer with `tokenizers` for models trained from scratch.

Writes tokenizer.json and tokenizer_config.json (ChatML chat template), loadable by
fleetlm.model.tokenizer.Tokenizer and by transformers' AutoTokenizer (PreTrainedTokenizerFast).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fleetlm.errors import ConfigError

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]

# ChatML as Qwen2 uses it: each turn is <|im_start|>role\ncontent<|im_end|>\n; answers end at <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
              model_max_length: int = 2048, individual_digits: bool = False) -> Path:
    """Fit a byte-level BPE of `vocab_size` ids (256 bytes, merges, 3 special tokens); save it to out_dir.

    With `individual_digits` every digit is its own token, as in Llama's tokenizer: a small model learns
    arithmetic digit by digit far more easily than over merged multi-digit chunks.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size {vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} specials")
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if individual_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no text is out of vocabulary
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": IM_END, "pad_token": PAD}, indent=2) + "\n")
    return out
