"""`fleet voice`: the pronunciation lexicon (`lexicon add|list|rm`), and `say TEXT -o FILE` to hear it."""

from __future__ import annotations

from pathlib import Path

import typer

from fleetlm.errors import FleetError

voice_app = typer.Typer(name="voice", help="Speech out: say text to a file; edit the pronunciation lexicon.",
                        no_args_is_help=True)
lexicon_app = typer.Typer(name="lexicon", help="The pronunciation lexicon every speech request uses.",
                          no_args_is_help=True)
voice_app.add_typer(lexicon_app, name="lexicon")

_LEXICON_OPTION = typer.Option(
    None, "--lexicon",
    help="The lexicon file (default: <fleet home>/voice/lexicon.json, what a gateway without voice.lexicon "
         "in fleet.yaml uses).",
)


def _store(path: Path | None):  # type: ignore[no-untyped-def]
    from fleetlm.voice.lexicon import LexiconStore

    return LexiconStore(path)


@lexicon_app.command("add")
def lexicon_add(
    word: str = typer.Argument(..., help="A word or phrase (matched case-insensitively, as whole words)."),
    ipa: str = typer.Option(None, "--ipa", help="Its phonemes in espeak-ng IPA (`espeak-ng --ipa -q WORD`)."),
    say: str = typer.Option(None, "--say", help="A respelling spoken instead."),
    lexicon: Path = _LEXICON_OPTION,
) -> None:
    """Add or replace a word's pronunciation."""
    from fleetlm.voice.lexicon import parse_entry

    if (ipa is None) == (say is None):
        raise FleetError("give exactly one of --ipa or --say")
    entry = parse_entry({"ipa": ipa} if ipa is not None else {"say": say})
    key = _store(lexicon).add(word, entry)
    typer.echo(f"{key}\t{'ipa' if entry.ipa is not None else 'say'}\t{entry.ipa or entry.say}")


@lexicon_app.command("list")
def lexicon_list(lexicon: Path = _LEXICON_OPTION) -> None:
    """Every entry: word, kind (ipa or say), value."""
    for word, entry in sorted(_store(lexicon).load().items()):
        typer.echo(f"{word}\t{'ipa' if entry.ipa is not None else 'say'}\t{entry.ipa or entry.say}")


@lexicon_app.command("rm")
def lexicon_rm(word: str = typer.Argument(...), lexicon: Path = _LEXICON_OPTION) -> None:
    """Remove a word's entry."""
    if not _store(lexicon).remove(word):
        raise FleetError(f"the lexicon has no entry for {word!r}")
    typer.echo(f"removed {' '.join(word.split()).lower()}")


@voice_app.command("say")
def say(
    text: str = typer.Argument(..., help="Plain text, or SSML starting with <speak>."),
    output: Path = typer.Option(..., "-o", "--output", help="The audio file; its suffix picks the format "
                                                             "(mp3, opus, aac, flac, wav, pcm)."),
    voice: str = typer.Option("alloy", "--voice", help="An OpenAI voice name or joe."),
    model: str = typer.Option("tts-1", "--model", help="tts-1, tts-1-hd, gpt-4o-mini-tts, piper, espeak-ng."),
    speed: float = typer.Option(1.0, "--speed", help="0.25-4.0."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="Expand numbers, dates, ..."),
    lexicon: Path = _LEXICON_OPTION,
) -> None:
    """Speak TEXT into a file, with the lexicon applied, as the gateway would."""
    from fleetlm.voice.encode import FORMATS, encode_stream
    from fleetlm.voice.tts import synthesize
    from fleetlm.voice.voices import resolve_model

    fmt = output.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise FleetError(f"the output's suffix must be one of {', '.join(FORMATS)}, got {output.name!r}")
    chunks = synthesize(text, voice=voice, speed=speed, normalize=normalize, engine=resolve_model(model),
                        stored_lexicon=_store(lexicon).load())
    with output.open("wb") as f:
        for piece in encode_stream(chunks, fmt):
            f.write(piece)
    typer.echo(f"wrote {output}")


def register(app: typer.Typer) -> None:
    app.add_typer(voice_app, name="voice")
