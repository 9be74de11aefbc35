"""The SSML subset: segments from <speak> input, and clear errors for markup outside it."""

import pytest

from fleetlm.voice.ssml import BREAK_STRENGTHS, MAX_BREAK_S, Segment, SsmlError, is_ssml, parse_input


def test_plain_text_with_angle_brackets_is_not_ssml():
    text = "if a < b and c > d, say <speak> later"
    assert not is_ssml(text)
    assert parse_input(text) == [Segment("text", text)]


def test_phoneme_sub_and_break_become_segments():
    segs = parse_input('<speak>Say <phoneme alphabet="ipa" ph="təmˈɑːtoʊ">tomato</phoneme> '
                       '<break time="500ms"/>then <sub alias="World Wide Web">WWW</sub>.</speak>')
    assert segs == [
        Segment("text", "Say "),
        Segment("phonemes", "təmˈɑːtoʊ"),
        Segment("text", " "),
        Segment("break", seconds=0.5),
        Segment("text", "then "),
        Segment("words", "World Wide Web"),
        Segment("text", "."),
    ]


@pytest.mark.parametrize("attrs, seconds", [('time="1.5s"', 1.5), ('time="250ms"', 0.25),
                                            ('strength="strong"', BREAK_STRENGTHS["strong"]),
                                            ("", BREAK_STRENGTHS["medium"])])
def test_break_durations(attrs, seconds):
    assert parse_input(f"<speak>a<break {attrs}/>b</speak>")[1] == Segment("break", seconds=seconds)


def test_say_as_characters_spells_the_letters():
    (seg,) = parse_input('<speak><say-as interpret-as="characters">abc</say-as></speak>')
    assert seg.kind == "words"
    assert seg.value.lower().split()[:3] == ["a", "b", "c"]


def test_say_as_cardinal_has_no_digits_left():
    (seg,) = parse_input('<speak><say-as interpret-as="cardinal">42</say-as></speak>')
    assert seg.kind == "words" and seg.value and not any(c.isdigit() for c in seg.value)


def test_paragraphs_and_sentences_pause():
    segs = parse_input("<speak><p>One.</p><s>Two.</s></speak>")
    assert [s.kind for s in segs] == ["text", "break", "text", "break"]


@pytest.mark.parametrize("ssml, fragment", [
    ("<speak>unclosed <break time='1s'></speak>", "malformed SSML"),
    ("<speak>a & b</speak>", "malformed SSML"),
    ('<!DOCTYPE speak [<!ENTITY x "boom">]><speak>&x;</speak>', "DOCTYPE"),
    ("<speak><audio src='x.wav'/></speak>", "unsupported SSML element <audio>"),
    ('<speak><phoneme alphabet="x-sampa" ph="t@">t</phoneme></speak>', 'alphabet="ipa"'),
    ("<speak><phoneme>t</phoneme></speak>", "ph attribute"),
    ('<speak><break time="soon"/></speak>', "500ms"),
    (f'<speak><break time="{MAX_BREAK_S + 1:g}s"/></speak>', "at most"),
    ('<speak><break strength="huge"/></speak>', "strength"),
    ('<speak><say-as interpret-as="poem">x</say-as></speak>', "poem"),
    ("<speak><sub>x</sub></speak>", "alias"),
])
def test_bad_ssml_is_a_clear_error(ssml, fragment):
    with pytest.raises(SsmlError) as info:
        parse_input(ssml)
    assert fragment in str(info.value)


def test_a_billion_laughs_is_refused_before_parsing():
    bomb = ('<!DOCTYPE speak [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            "<speak>&b;</speak>")
    with pytest.raises(SsmlError, match="DOCTYPE"):
        parse_input(bomb)


def test_an_xml_declaration_before_speak_is_read():
    assert parse_input('<?xml version="1.0"?><speak>hi</speak>') == [Segment("text", "hi")]
