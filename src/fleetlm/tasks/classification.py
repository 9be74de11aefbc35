"""Sentiment and topic labels for short template texts: easy on purpose; level = filler sentences."""

from __future__ import annotations

import random

from fleetlm.tasks.base import Task

DOMAIN = "classification"
LEVELS = (1, 2, 3)
SUBJECTS = ("The food", "The hotel", "The film", "The service", "The phone", "The trip", "The book",
            "The game")
SENTIMENT = {
    "positive": ("great", "wonderful", "excellent", "lovely", "superb", "fantastic"),
    "negative": ("awful", "terrible", "boring", "dreadful", "poor", "disappointing"),
}
TOPICS = {
    "sports": ("The team won the match in extra time.", "She scored two goals in the final.",
               "The runner set a new record in the race.", "The coach picked a new captain."),
    "food": ("He baked fresh bread with garlic.", "The soup needs more salt and pepper.",
             "We cooked rice with beans for dinner.", "The cake was made with apples."),
    "tech": ("The new laptop has a faster chip.", "The app crashed after the update.",
             "They wrote code to speed up the server.", "The phone battery lasts two days."),
    "travel": ("We took the night train to the coast.", "The flight landed at the island airport.",
               "They booked a room near the old harbor.", "She packed a bag for the mountain trip."),
    "money": ("The bank raised its interest rate.", "Prices rose faster than wages this year.",
              "He saved part of his salary each month.", "The shares fell after the report."),
}
# Neutral sentences that carry no label: the harder levels bury the signal among them.
FILLER = ("It was a Tuesday.", "There were five of us.", "The weather was mild.", "I went there in May.",
          "My friend came along.", "It took about an hour.", "We arrived around noon.")


def generate(rng: random.Random, level: int) -> Task:
    fillers = rng.sample(FILLER, level - 1)
    if rng.random() < 0.5:
        label = rng.choice(sorted(SENTIMENT))
        signal = f"{rng.choice(SUBJECTS)} was {rng.choice(SENTIMENT[label])}."
        kind, prompt = "sentiment", "Sentiment (positive or negative)"
    else:
        label = rng.choice(sorted(TOPICS))
        signal = rng.choice(TOPICS[label])
        kind, prompt = "topic", f"Topic ({', '.join(sorted(TOPICS))})"
    sentences = fillers + [signal]
    rng.shuffle(sentences)
    return Task(DOMAIN, level, kind, f"{prompt}: {' '.join(sentences)}", label, "text")
