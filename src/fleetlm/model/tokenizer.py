"""The tokenizer of an HF checkpoint dir: `tokenizers` for the ids, jinja2 for the chat template.

The ids equal transformers' PreTrainedTokenizerFast on the same files, and the chat template is rendered in
an environment set up the way transformers sets up its own, so the prompt strings are identical.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

from fleetlm.errors import CheckpointError, FleetError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization: spaces before punctuation and English contractions.
_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class ChatTemplateError(FleetError):
    """The model has no chat template, or the template rejected the conversation."""


class Tokenizer:
    def __init__(
        self,
        backend: _Backend,
        config: dict[str, Any] | None = None,
        chat_template: str | dict[str, str] | None = None,
        extra_eos_ids: list[int] | None = None,
    ) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.special_tokens = {
            k: v for k in SPECIAL_KEYS if (v := _token_str(self.config.get(k))) is not None
        }
        self.bos_token_id = self.token_id(self.special_tokens.get("bos_token"))
        eos = self.token_id(self.special_tokens.get("eos_token"))
        self.eos_token_ids = list(dict.fromkeys(([] if eos is None else [eos]) + list(extra_eos_ids or [])))
        pad = self.token_id(self.special_tokens.get("pad_token"))
        # Any id works for padding (padded slots are masked); fall back to eos, as generate() does.
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.clean_up_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise CheckpointError(f"no tokenizer.json in {root}")
        try:
            backend = _Backend.from_file(str(root / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises a bare Exception for a malformed file
            raise CheckpointError(f"unreadable tokenizer.json in {root}: {exc}") from None
        config = _read_json(root / "tokenizer_config.json")
        template: str | dict[str, str] | None = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            template = {t["name"]: t["template"] for t in template}
        if template is None and (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text()
        if template is None and (root / "chat_template.json").is_file():
            template = _read_json(root / "chat_template.json").get("chat_template")
        gen = _read_json(root / "generation_config.json")
        eos = gen.get("eos_token_id")
        extra = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        return cls(backend, config, template, [int(e) for e in extra])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """The prompt string, identical to transformers' apply_chat_template(..., tokenize=False)."""
        source = self._template_source(tools)
        context = {**self.special_tokens, **kwargs}
        if "additional_special_tokens" in self.config:
            context.setdefault(
                "additional_special_tokens", [_token_str(t) for t in self.config["additional_special_tokens"]]
            )
        try:
            text = compile_template(source).render(
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from None
        if continue_final_message:
            # Cut after the final message's text, so that generation continues it instead of a new turn.
            final = messages[-1]["content"]
            if final not in text:
                raise ChatTemplateError(
                    "continue_final_message: the final message is not in the rendered prompt"
                )
            text = text[: text.rindex(final) + len(final)]
        return text

    def _template_source(self, tools: list | None) -> str:
        template = self.chat_template
        if isinstance(template, dict):
            name = "tool_use" if tools and "tool_use" in template else "default"
            if name not in template:
                raise ChatTemplateError(f"no {name!r} chat template (have {', '.join(template)})")
            template = template[name]
        if not template:
            raise ChatTemplateError("this tokenizer has no chat template")
        return template

    def save(self, path: str | Path) -> Path:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(root / "tokenizer.json"))
        config = dict(self.config)
        if self.chat_template is not None:
            template = self.chat_template
            config["chat_template"] = (
                [{"name": k, "template": v} for k, v in template.items()]
                if isinstance(template, dict)
                else template
            )
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return root


def _token_str(token: Any) -> str | None:
    # tokenizer_config.json writes a special token either as a string or as an AddedToken dict.
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for masks; when rendering, a no-op."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja2's own tojson, no HTML escaping: prompts are not HTML.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox with transformers' settings (block trimming, helpers)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not parse: {exc}") from None
