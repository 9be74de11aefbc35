"""Voice round trip (issue 15): our TTS's speech transcribed by our ASR, scored against what should be heard.

    .venv/bin/python bench/voice_roundtrip.py [--sentences 200] [--seed 0] [--requests 20]
        [--formats mp3,pcm] [--hard-words 38] [--skip-gateway] [--out $FLEET_HOME/bench/voice] [--no-progress]
    .venv/bin/python bench/voice_roundtrip.py --rescore RESULTS_JSON [--out DIR]

Wrap it in `flock /tmp/bench.lock` on a shared machine: it runs Piper and Whisper for minutes.

1. Word error rate. Each sentence of fleetlm.voice.roundtrip's set (numbers, currencies, dates, times, phone
   numbers, ordinals, abbreviations, acronyms, names, units, plain and mixed sentences, each with its
   reference: the words a listener should hear) is synthesised by `fleetlm.voice.tts.synthesize` (the joe
   Piper voice, no stored lexicon) twice: with our text normalisation and without it (then Piper's espeak-ng
   reads the raw text its own way), and each audio is transcribed by `fleetlm.voice.asr.transcribe` (Whisper
   tiny.en). WER is scored after roundtrip.spoken_form on both sides (its docstring says the rules), overall
   and per category.
2. Hard words: each of roundtrip.HARD_WORDS in its carrier sentence, without the lexicon, with its lexicon
   entry (per request, IPA), and with the entry plus an ASR prompt listing every hard word (Whisper's
   initial prompt: a vocabulary hint, the ASR-side lever); a match is the intended spelling in the transcript.
3. Speed: real-time factor (compute seconds / audio seconds, summed over all of part 1) of the TTS and of
   the ASR, wall clock (what a caller waits, on this machine's cores as shared at the time) and CPU seconds
   of this process (all threads). The machine's load average is printed with them.
4. Time to first audio byte of `POST /v1/audio/speech` through `fleet serve` (a real process on a loopback
   port), with the official client's `client.audio.speech.with_streaming_response.create`, against the time
   to the last byte: median and p95 over --requests requests of three sentences each, per format.

Written to --out: results.json (settings, every item with both transcripts, the summaries) and voice.png
(WER per category, with and without normalisation). --rescore scores a saved results.json's transcripts
again with the current rules of fleetlm.voice.roundtrip (speed and streaming figures are carried over).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from fleetlm.voice import roundtrip as rt

MODES = (("normalised", True), ("raw", False))
PCM_RATE = 24000  # OpenAI's pcm: 24 kHz, 16-bit, mono


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from fleetlm.catalog.store import fleet_home

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", type=int, default=200, help="sentences of the set (interleaved categories)")
    p.add_argument("--seed", type=int, default=0, help="the set's template seed")
    p.add_argument("--hard-words", type=int, default=len(rt.HARD_WORDS), help="the first N hard words")
    p.add_argument("--voice", default="alloy", help="an OpenAI voice name or a local voice")
    p.add_argument("--requests", type=int, default=20, help="streamed speech requests per format")
    p.add_argument("--formats", default="mp3,pcm", help="response formats for the streamed requests")
    p.add_argument("--skip-gateway", action="store_true", help="no streamed requests (parts 1-3 only)")
    p.add_argument("--out", type=Path, default=fleet_home() / "bench" / "voice")
    p.add_argument("--rescore", type=Path, default=None, metavar="RESULTS_JSON",
                   help="score a run's saved transcripts again with the current rules (no audio is made)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not 1 <= args.sentences <= len(rt.sentence_set(seed=args.seed)):
        p.error(f"--sentences must be 1..{len(rt.sentence_set(seed=args.seed))}")
    if args.requests < 1:
        p.error("--requests must be >= 1")
    return args


@dataclass
class Timing:
    """Compute spent on audio: wall and CPU seconds, and the seconds of audio they made or read."""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    audio_s: float = 0.0

    def add(self, wall_s: float, cpu_s: float, audio_s: float) -> None:
        self.wall_s += wall_s
        self.cpu_s += cpu_s
        self.audio_s += audio_s

    def summary(self) -> dict[str, float]:
        rtf = self.wall_s / self.audio_s if self.audio_s else float("nan")
        cpu = self.cpu_s / self.audio_s if self.audio_s else float("nan")
        return {"wall_s": round(self.wall_s, 2), "cpu_s": round(self.cpu_s, 2),
                "audio_s": round(self.audio_s, 2), "rtf_wall": round(rtf, 4), "rtf_cpu": round(cpu, 4)}


class Speaker:
    """Our TTS then our ASR, timed; the stored lexicon is left out so a user's entries change nothing."""

    def __init__(self, voice: str):
        self.voice = voice
        self.tts, self.asr = Timing(), Timing()
        self.speak("Warm up.")  # loads Piper and Whisper outside the timed calls
        self.hear(self.speak("Warm up.")[0], 22050)
        self.tts, self.asr = Timing(), Timing()

    def speak(self, text: str, *, normalize: bool = True,
              lexicon: dict[str, Any] | None = None) -> tuple[np.ndarray, int]:
        from fleetlm.voice.tts import synthesize

        wall, cpu = time.perf_counter(), time.process_time()
        pieces = list(synthesize(text, voice=self.voice, normalize=normalize, lexicon=lexicon,
                                 stored_lexicon={}))
        rate = pieces[0][1] if pieces else 22050
        audio = np.concatenate([a for a, _ in pieces]) if pieces else np.zeros(0, np.int16)
        self.tts.add(time.perf_counter() - wall, time.process_time() - cpu, len(audio) / rate)
        return audio, rate

    def hear(self, audio: np.ndarray, rate: int, *, prompt: str | None = None) -> str:
        from fleetlm.voice.asr import transcribe

        wall, cpu = time.perf_counter(), time.process_time()
        text = transcribe(wav_file(audio, rate), prompt=prompt).text
        self.asr.add(time.perf_counter() - wall, time.process_time() - cpu, len(audio) / rate)
        return text


def wav_file(audio: np.ndarray, rate: int) -> io.BytesIO:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(audio.astype("<i2").tobytes())
    buf.seek(0)
    return buf


def round_trip(speaker: Speaker, sentences: list[rt.Sentence], progress: bool) -> list[dict[str, Any]]:
    """Every sentence spoken with and without normalisation and heard back; one row per sentence."""
    from fleetlm.errors import FleetError

    rows = []
    for s in tqdm(sentences, desc="round trip", disable=not progress):
        row: dict[str, Any] = asdict(s)
        for mode, flag in MODES:
            try:
                audio, rate = speaker.speak(s.text, normalize=flag)
                heard, error = speaker.hear(audio, rate), None
            except (FleetError, ValueError) as exc:  # counted as nothing heard, and reported
                heard, error = "", f"{type(exc).__name__}: {exc}"[:300]
            errors = rt.word_errors(s.reference, heard)
            row[mode] = {"heard": heard, "error": error, **asdict(errors)}
        rows.append(row)
    return rows


def wer_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per category (then "all"): sentences, reference words, WER in each mode."""
    categories = [c for c in rt.CATEGORIES if any(r["category"] == c for r in rows)]
    table = []
    for category in [*categories, "all"]:
        chosen = [r for r in rows if category in ("all", r["category"])]
        entry: dict[str, Any] = {"category": category, "n": len(chosen)}
        for mode, _ in MODES:
            total = sum((rt.Errors(**{k: r[mode][k] for k in ("substitutions", "deletions", "insertions",
                                                               "words")}) for r in chosen), rt.Errors())
            entry["words"] = total.words
            entry[f"{mode}_wer"] = total.wer
            entry[f"{mode}_failed"] = sum(bool(r[mode]["error"]) for r in chosen)
        table.append(entry)
    return table


def hard_words(speaker: Speaker, words: tuple[rt.HardWord, ...], progress: bool) -> list[dict[str, Any]]:
    """Each hard word said without and with its lexicon entry (and with the ASR prompt); matched or not."""
    vocabulary = ", ".join(h.word for h in rt.HARD_WORDS)
    rows = []
    for h in tqdm(words, desc="hard words", disable=not progress):
        plain = speaker.hear(*speaker.speak(h.text))
        audio, rate = speaker.speak(h.text, lexicon=h.lexicon())
        with_lexicon = speaker.hear(audio, rate)
        with_prompt = speaker.hear(audio, rate, prompt=vocabulary)
        rows.append({"word": h.word, "ipa": h.ipa, "why": h.why, "text": h.text,
                     "without": plain, "with_lexicon": with_lexicon, "with_lexicon_and_prompt": with_prompt,
                     **{f"match_{k}": rt.contains_word(v, h.spellings) for k, v in
                        (("without", plain), ("with_lexicon", with_lexicon),
                         ("with_lexicon_and_prompt", with_prompt))}})
    return rows


def percentile(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def streamed_requests(sentences: list[rt.Sentence], args: argparse.Namespace,
                      progress: bool) -> dict[str, Any]:
    """Time to first and last byte of streamed speech through `fleet serve`, per response format."""
    import httpx
    import openai

    from fleetlm.demo.run import GatewayProcess

    out: Path = args.out
    config = out / "fleet.yaml"
    # A remote model nobody calls: the gateway needs one model; speech needs none of them.
    config.write_text(yaml.safe_dump({"models": {"unused": {"remote": "http://127.0.0.1:9/v1"}},
                                      "voice": {"lexicon": str((out / "lexicon.json").resolve())}}))
    gateway = GatewayProcess(config, f"sqlite:///{(out / 'usage.db').resolve()}", out / "gateway.log")
    texts = [" ".join(s.text for s in sentences[3 * i:3 * i + 3]) for i in range(args.requests)]
    results: dict[str, Any] = {}
    try:
        client = openai.OpenAI(base_url=gateway.url, api_key="unused", http_client=httpx.Client(timeout=120))
        # one untimed request: the gateway loads Piper on its first speech request
        with client.audio.speech.with_streaming_response.create(model="tts-1", voice=args.voice,
                                                                 input="Warm up.") as resp:
            resp.read()
        for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
            first, last, sizes = [], [], []
            for text in tqdm(texts, desc=f"speech {fmt}", disable=not progress):
                started = time.perf_counter()
                ttfb, size = None, 0
                with client.audio.speech.with_streaming_response.create(
                        model="tts-1", voice=args.voice, input=text, response_format=fmt) as resp:
                    for chunk in resp.iter_bytes():
                        if chunk and ttfb is None:
                            ttfb = time.perf_counter() - started
                        size += len(chunk)
                last.append(time.perf_counter() - started)
                first.append(ttfb if ttfb is not None else last[-1])
                sizes.append(size)
            entry = {"requests": len(texts), "ttfb_median_s": statistics.median(first),
                     "ttfb_p95_s": percentile(first, 0.95), "ttlb_median_s": statistics.median(last),
                     "ttlb_p95_s": percentile(last, 0.95), "bytes_median": statistics.median(sizes),
                     "ttfb_s": first, "ttlb_s": last}
            if fmt == "pcm":
                entry["audio_s_median"] = statistics.median(sizes) / (2 * PCM_RATE)
            results[fmt] = entry
    finally:
        gateway.stop()
    results["input_chars_median"] = statistics.median(len(t) for t in texts)
    return results


def format_table(head: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]

    def line(c: list[str]) -> str:
        return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths,
                                                                                              strict=True)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *[line(c) for c in cells]])


def print_report(table: list[dict[str, Any]], hard: list[dict[str, Any]], speed: dict[str, Any],
                 stream: dict[str, Any] | None) -> None:
    print("\nWER after spoken_form on both sides (fleetlm.voice.roundtrip), TTS joe (Piper) -> ASR Whisper "
          "tiny.en")
    print(format_table(["category", "sentences", "ref words", "WER normalised %", "WER raw %", "failed"],
                       [[r["category"], str(r["n"]), str(r["words"]), f"{100 * r['normalised_wer']:.1f}",
                         f"{100 * r['raw_wer']:.1f}", f"{r['normalised_failed']}/{r['raw_failed']}"]
                        for r in table]))
    n = len(hard)
    counts = {k: sum(r[f"match_{k}"] for r in hard)
              for k in ("without", "with_lexicon", "with_lexicon_and_prompt")}
    print(f"\nHard words ({n}): transcript holds the intended spelling: "
          f"without lexicon {counts['without']}/{n}, "
          f"with lexicon {counts['with_lexicon']}/{n}, with lexicon and ASR prompt "
          f"{counts['with_lexicon_and_prompt']}/{n}")
    print(f"\nSpeed (load average {speed['load_before']} before, {speed['load_after']} after; "
          f"{os.cpu_count()} cores)")
    print(format_table(["stage", "audio s", "wall s", "RTF wall", "CPU s", "RTF CPU"],
                       [[k, f"{v['audio_s']:.1f}", f"{v['wall_s']:.1f}", f"{v['rtf_wall']:.3f}",
                         f"{v['cpu_s']:.1f}", f"{v['rtf_cpu']:.3f}"] for k, v in
                        (("TTS (Piper joe)", speed["tts"]), ("ASR (tiny.en)", speed["asr"]))]))
    if stream:
        print(f"\nStreamed POST /v1/audio/speech through fleet serve (official client, "
              f"{stream['input_chars_median']:.0f} characters median input)")
        print(format_table(["format", "requests", "TTFB median s", "TTFB p95 s", "last byte median s",
                            "last byte p95 s"],
                           [[f, str(v["requests"]), f"{v['ttfb_median_s']:.3f}", f"{v['ttfb_p95_s']:.3f}",
                             f"{v['ttlb_median_s']:.3f}", f"{v['ttlb_p95_s']:.3f}"]
                            for f, v in stream.items() if isinstance(v, dict)]))


def write_plot(table: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.4
    for k, (mode, _) in enumerate(MODES):
        xs = [i + (k - 0.5) * width for i in range(len(table))]
        wers = [100 * r[f"{mode}_wer"] for r in table]
        label = f"{mode} (text normalisation {'on' if mode == 'normalised' else 'off'})"
        bars = ax.bar(xs, wers, width, label=label)
        for bar, w in zip(bars, wers, strict=True):
            ax.annotate(f"{w:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(table)), [f"{r['category']}\n({r['n']})" for r in table], fontsize=8)
    ax.set_ylabel("WER %")
    ax.set_title("TTS (Piper joe) -> ASR (Whisper tiny.en) round trip: WER by category (sentences)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rescore(path: Path, out: Path) -> int:
    """A saved run's transcripts scored again by the current spoken_form (new rules, the same audio)."""
    report = json.loads(path.read_text())
    spellings = {h.word: h.spellings for h in rt.HARD_WORDS}
    for item in report["items"]:
        for mode, _ in MODES:
            item[mode].update(asdict(rt.word_errors(item["reference"], item[mode]["heard"])))
    for h in report["hard_words"]:
        for k in ("without", "with_lexicon", "with_lexicon_and_prompt"):
            h[f"match_{k}"] = rt.contains_word(h[k], spellings.get(h["word"], (h["word"],)))
    report["wer"] = wer_table(report["items"])
    report["settings"]["rescored_from"] = str(path)
    print_report(report["wer"], report["hard_words"], report["speed"], report["streamed_speech"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    plot = write_plot(report["wer"], out / "voice.png")
    print(f"\nresults: {out / 'results.json'}  plot: {plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from fleetlm.errors import FleetError

    args = parse_args(argv)
    if args.rescore:
        if not args.rescore.is_file():
            print(f"error: no results file {args.rescore}", file=sys.stderr)
            return 2
        return rescore(args.rescore, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    started = time.time()
    sentences = rt.sentence_set(args.sentences, seed=args.seed)
    load_before = [round(x, 2) for x in os.getloadavg()]
    speaker = Speaker(args.voice)
    rows = round_trip(speaker, sentences, progress)
    speed = {"tts": speaker.tts.summary(), "asr": speaker.asr.summary(), "load_before": load_before,
             "load_after": [round(x, 2) for x in os.getloadavg()]}
    hard = hard_words(speaker, rt.HARD_WORDS[:args.hard_words], progress)
    stream = None
    if not args.skip_gateway:
        try:
            stream = streamed_requests(rt.sentence_set(seed=args.seed + 1), args, progress)
        except FleetError as exc:
            print(f"error: streamed requests: {exc} (gateway log: {args.out / 'gateway.log'})",
                  file=sys.stderr)
    table = wer_table(rows)
    print_report(table, hard, speed, stream)
    report = {"settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "seconds": round(time.time() - started, 1), "cores": os.cpu_count()},
              "wer": table, "speed": speed, "hard_words": hard, "streamed_speech": stream, "items": rows}
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    plot = write_plot(table, args.out / "voice.png")
    print(f"\nresults: {args.out / 'results.json'}  plot: {plot}  ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
