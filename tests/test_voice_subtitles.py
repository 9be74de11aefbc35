"""voice/subtitles.py: SubRip and WebVTT cues, and OpenAI's verbose_json, from a Transcript's segments."""

from fleetlm.voice.asr import Segment, Transcript, Word
from fleetlm.voice.subtitles import srt, verbose_json, vtt


def segment(i: int, start: float, end: float, text: str, words: list[Word] | None = None) -> Segment:
    return Segment(id=i, start=start, end=end, text=text, tokens=[50363, 10, 11], temperature=0.0,
                   avg_logprob=-0.25, compression_ratio=1.1, no_speech_prob=0.01, words=words, seek=100 * i)


SEGMENTS = [
    segment(0, 0.0, 2.5, " Hello world.", [Word(0.0, 0.8, " Hello", 0.9), Word(0.8, 2.5, " world.", 0.8)]),
    segment(1, 3661.0015, 3663.9996, " An hour later.", [Word(3661.0015, 3663.9996, " later.", 0.7)]),
]
TRANSCRIPT = Transcript(text="Hello world. An hour later.", language="en", duration=3664.2, segments=SEGMENTS)


def test_srt_numbers_cues_from_one_with_comma_milliseconds():
    assert srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello world.\n"
        "\n"
        "2\n01:01:01,002 --> 01:01:04,000\nAn hour later.\n"
    )


def test_vtt_has_its_header_and_dot_milliseconds():
    assert vtt(SEGMENTS) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:02.500\nHello world.\n"
        "\n"
        "01:01:01.002 --> 01:01:04.000\nAn hour later.\n"
    )


def test_no_segments_give_empty_cues():
    assert srt([]) == ""
    assert vtt([]) == "WEBVTT\n\n"


def test_verbose_json_has_openais_fields_and_words_only_when_asked():
    body = verbose_json(TRANSCRIPT, task="translate")
    assert (body["task"], body["language"], body["duration"]) == ("translate", "english", 3664.2)
    assert body["text"] == "Hello world. An hour later."
    assert "words" not in body
    first = body["segments"][0]
    assert set(first) == {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                          "compression_ratio", "no_speech_prob"}
    assert (first["id"], first["start"], first["end"], first["text"]) == (0, 0.0, 2.5, " Hello world.")
    assert body["segments"][1]["seek"] == 100
    words = verbose_json(TRANSCRIPT, words=True)["words"]
    assert words == [{"word": "Hello", "start": 0.0, "end": 0.8},
                     {"word": "world.", "start": 0.8, "end": 2.5},
                     {"word": "later.", "start": 3661.0015, "end": 3663.9996}]
