"""A synthetic, separable sentiment set: templated sentences whose label is one word's polarity.

For tests and benchmarks. The label depends only on which list the sentiment word comes from,
so a tiny model can learn it in seconds, yet every sentence also carries neutral filler words.
"""

from __future__ import annotations

import random

LABELS: tuple[str, ...] = ("negative", "positive")

POSITIVE_WORDS: tuple[str, ...] = (
    "good", "great", "excellent", "wonderful", "lovely", "superb", "pleasant", "brilliant",
    "delightful", "fantastic", "amazing", "charming",
)  # fmt: skip
NEGATIVE_WORDS: tuple[str, ...] = (
    "bad", "awful", "terrible", "horrible", "poor", "dreadful", "boring", "disappointing",
    "mediocre", "nasty", "ugly", "annoying",
)  # fmt: skip
SUBJECTS: tuple[str, ...] = (
    "the film", "the meal", "the hotel", "the book", "this phone", "the service",
    "the concert", "our trip", "the game", "the show", "the room", "the coffee",
)  # fmt: skip
TEMPLATES: tuple[str, ...] = (
    "{subject} was {word} .",
    "i think {subject} is {word} .",
    "honestly , {subject} felt {word} to me .",
    "my friends said {subject} was really {word} .",
    "{subject} turned out {word} in the end .",
    "overall {subject} seemed quite {word} .",
)


def vocabulary() -> list[str]:
    """Every whole word the generated sentences use."""
    words: set[str] = set(POSITIVE_WORDS) | set(NEGATIVE_WORDS)
    for phrase in (*SUBJECTS, *TEMPLATES):
        words.update(w for w in phrase.split() if not w.startswith("{"))
    return sorted(words)


def sentiment_items(count: int, *, seed: int = 0) -> list[tuple[str, int]]:
    """``count`` (text, label) pairs, labels balanced (0 negative, 1 positive), seeded."""
    rng = random.Random(seed)
    items = []
    for index in range(count):
        label = index % 2
        word = rng.choice(POSITIVE_WORDS if label == 1 else NEGATIVE_WORDS)
        template = rng.choice(TEMPLATES)
        items.append((template.format(subject=rng.choice(SUBJECTS), word=word), label))
    rng.shuffle(items)
    return items
