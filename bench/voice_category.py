"""One category of the voice round trip, normalised against raw (a quick re-check after a normaliser fix).

    python bench/voice_category.py [--category phone] [--sentences 200]
"""

from __future__ import annotations

import argparse
import io
import wave

import numpy as np

from fleetlm.voice import roundtrip as rt
from fleetlm.voice.asr import transcribe
from fleetlm.voice.tts import synthesize


def wav(parts: list[tuple[np.ndarray, int]]) -> io.BytesIO:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(parts[0][1])
        w.writeframes(np.concatenate([a for a, _ in parts]).tobytes())
    buf.seek(0)
    return buf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--category", default="phone")
    parser.add_argument("--sentences", type=int, default=200)
    args = parser.parse_args()
    chosen = [s for s in rt.sentence_set(args.sentences) if s.category == args.category]
    if not chosen:
        raise SystemExit(f"no sentence of category {args.category!r} in the first {args.sentences}")
    refs = [rt.spoken_form(s.reference) for s in chosen]
    heard = {}
    for normalize in (True, False):
        heard[normalize] = [rt.spoken_form(transcribe(wav(list(synthesize(s.text, voice="alloy",
                                                                          normalize=normalize)))).text)
                            for s in chosen]
    print(f"{args.category}: {len(chosen)} sentences, WER normalised {rt.wer(refs, heard[True]):.1%}, "
          f"raw {rt.wer(refs, heard[False]):.1%}")


if __name__ == "__main__":
    main()
