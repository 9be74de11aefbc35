import random
from collections import Counter

from fleetlm.tasks import classification

# An independent key: the cue words each label is signalled by.
SENTIMENT_CUES = {"positive": {"great", "wonderful", "excellent", "lovely", "superb", "fantastic"},
                  "negative": {"awful", "terrible", "boring", "dreadful", "poor", "disappointing"}}
TOPIC_CUES = {"sports": {"match", "goals", "race", "coach"}, "food": {"bread", "soup", "rice", "cake"},
              "tech": {"laptop", "app", "code", "battery"}, "travel": {"train", "flight", "harbor", "trip"},
              "money": {"bank", "prices", "salary", "shares"}}


def _draw(level: int, n: int = 300):
    rng = random.Random(20 + level)
    return [classification.generate(rng, level) for _ in range(n)]


def test_labels_match_cue_words_in_the_text():
    for level in classification.LEVELS:
        for t in _draw(level):
            text = t.question.split(": ", 1)[1].lower()
            words = set(text.replace(".", " ").split())
            cues = SENTIMENT_CUES if t.kind == "sentiment" else TOPIC_CUES
            found = {label for label, cue in cues.items() if words & cue}
            assert found == {t.answer}, (t.question, found)


def test_level_adds_filler_sentences_and_labels_are_balanced():
    for level in classification.LEVELS:
        tasks = _draw(level)
        assert {t.question.split(": ", 1)[1].count(".") for t in tasks} == {level}
    labels = Counter(t.answer for t in _draw(1, 2000))
    assert set(labels) == set(SENTIMENT_CUES) | set(TOPIC_CUES)
    assert min(labels.values()) > 100
