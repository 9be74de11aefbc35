"""The tokenizer of an HF checkpoint dir: `tokenizers` for the ids, jinja2 for the chat template.

The ids equal transformers' PreTrainedTokenizerFast on the same files, and the chat template is rendered in
an environment set up the way transformers sets up its own, so the prompt strings are identical.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import Tokenizer as _Backend

from fleetlm.errors import CheckpointError, FleetError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization: spaces before punctuation and English contractions (never for BPE).
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
# Names a message's reasoning travels under; templates read the first, gpt-oss style ones read "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_MARK = "\u2063FLEET_CONTINUE\u2063 "  # appended to the final message to find where it ends


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
        # transformers skips the cleanup for BPE models: it would eat real spaces before punctuation.
        self.clean_up_spaces = bool(self.config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(
                self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
            )
        )
        # Ids come from tokenizer.json's post-processor alone: transformers 5 (TokenizersBackend) ignores
        # add_bos_token/add_eos_token in tokenizer_config.json too.

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
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
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
        continue_final_message: bool | str = False,
        **kwargs: Any,
    ) -> str:
        """The prompt string, identical to transformers' apply_chat_template(..., tokenize=False).

        continue_final_message: leave the last message open (no end-of-turn) so that generation continues it;
        True means its "content", a string names another field (e.g. "reasoning_content").
        """
        if not messages:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation")
        source = self._template_source(tools)
        # Like transformers: keys set to None are dropped (OpenAI clients send content=None), plain data only.
        chat = _plain(list(messages))
        if not all(isinstance(m, dict) for m in chat):
            raise ChatTemplateError("chat messages must be dicts like {'role': 'user', 'content': '...'}")
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in chat]
        field = final = None
        if continue_final_message:
            add_generation_prompt = False
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final = chat[-1].get(field)
            if not isinstance(final, str):
                raise ChatTemplateError(f"continue_final_message: the final message has no text {field!r}")
            fields = (
                [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
                if field in _REASONING_FIELDS
                else [field]
            )
            for f in fields:
                chat[-1][f] = final + _CONTINUE_MARK
        context = {**self.special_tokens, **_plain(kwargs)}
        try:
            text = compile_template(source).render(
                messages=chat,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as exc:  # TypeError: e.g. tojson of an Undefined
            raise ChatTemplateError(f"chat template failed: {exc}") from None
        if final is not None:
            mark = _CONTINUE_MARK.strip()
            if mark not in text:
                raise ChatTemplateError("continue_final_message: the template drops the final message")
            cut = text.rindex(mark)
            # A template that trims the message also trimmed the mark's trailing space: trim the same way.
            text = text[:cut] if text[cut:].startswith(_CONTINUE_MARK) else text[:cut].rstrip()
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


def _plain(value: Any) -> Any:
    """Rebuild what a template sees from plain JSON-like data (dataclasses and pydantic models included)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy scalars) are cut back to the base type, so templates see no extra methods.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (
            type(value)(_plain(v) for v in value) if isinstance(value, tuple) else [_plain(v) for v in value]
        )
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(Namespace):
    """jinja2's namespace(), refusing underscore names (a sandbox escape route)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja2's signature trick keeps `self` free)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates may not set underscore attributes on a namespace: {name!r}")


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
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not parse: {exc}") from None
