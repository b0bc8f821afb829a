"""A deterministic, offline instruction dataset with short answers that can be checked.

It lets a run show real learning with no hub access: every task family has one exact short
answer, so a small instruct model fine-tuned for a few dozen LoRA steps visibly drops in loss
and rises in Rouge-L (it learns the terse answer format and, partly, the tasks themselves).
The `category` column holds the family name, so category-based non-IID partitioning works too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from datasets import Dataset

from fedinstruct.data.loading import CONTRACT_FEATURES

Sample = tuple[str, str, str]  # (instruction, context, response)

_WORDS = (
    "apple", "river", "green", "stone", "cloud", "tiger", "music", "paper", "light", "house",
    "bread", "ocean", "chair", "dream", "plant", "storm", "smile", "train", "glass", "honey",
    "garden", "winter", "silver", "forest", "orange", "planet", "window", "yellow", "banana",
    "rocket", "castle", "summer", "purple", "bridge", "candle", "mirror", "pencil", "violin",
)

_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Greece", "Athens"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Russia", "Moscow"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("Australia", "Canberra"), ("Turkey", "Ankara"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
    ("Belgium", "Brussels"), ("Vietnam", "Hanoi"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"),
)


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(_WORDS, rng.randint(low, high))


def _add(rng: random.Random) -> Sample:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    question = rng.choice(("What is {a} + {b}?", "Add {a} and {b}.",
                           "Compute the sum of {a} and {b}. Reply with the number only."))
    return question.format(a=a, b=b), "", str(a + b)


def _subtract(rng: random.Random) -> Sample:
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    question = rng.choice(("What is {a} - {b}?", "Subtract {b} from {a}.",
                           "How much is {a} minus {b}?"))
    return question.format(a=a, b=b), "", str(a - b)


def _reverse_words(rng: random.Random) -> Sample:
    words = _words(rng, 3, 5)
    question = rng.choice(("Reverse the order of the words in the text below.",
                           "Write the words of the input in reverse order."))
    return question, " ".join(words), " ".join(reversed(words))


def _sort_numbers(rng: random.Random) -> Sample:
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    descending = rng.random() < 0.3
    question = ("Sort these numbers from largest to smallest." if descending
                else "Sort these numbers from smallest to largest.")
    answer = sorted(numbers, reverse=descending)
    return question, ", ".join(map(str, numbers)), ", ".join(map(str, answer))


def _uppercase(rng: random.Random) -> Sample:
    text = " ".join(_words(rng, 2, 4))
    question = rng.choice(("Rewrite the text below in capital letters.",
                           "Convert the input to uppercase."))
    return question, text, text.upper()


def _country_capital(rng: random.Random) -> Sample:
    country, capital = rng.choice(_CAPITALS)
    question = rng.choice(("What is the capital of {c}?", "Name the capital city of {c}.",
                           "Which city is the capital of {c}?"))
    return question.format(c=country), "", capital


def _count_letters(rng: random.Random) -> Sample:
    word = rng.choice(_WORDS)
    letter = rng.choice(sorted(set(word)))
    question = f'How many times does the letter "{letter}" appear in the word below?'
    return question, word, str(word.count(letter))


_GENERATORS: dict[str, Callable[[random.Random], Sample]] = {
    "add": _add,
    "subtract": _subtract,
    "reverse_words": _reverse_words,
    "sort_numbers": _sort_numbers,
    "uppercase": _uppercase,
    "country_capital": _country_capital,
    "count_letters": _count_letters,
}
SYNTHETIC_FAMILIES: tuple[str, ...] = tuple(_GENERATORS)


def make_synthetic_dataset(num_samples: int, *, families: Sequence[str] | None = None,
                           seed: int = 0) -> Dataset:
    """Generate `num_samples` rows, families balanced (every family present when
    num_samples >= number of families) and shuffled; the same seed gives the same rows."""
    chosen = tuple(families) if families is not None else SYNTHETIC_FAMILIES
    unknown = [name for name in chosen if name not in _GENERATORS]
    if unknown or not chosen:
        raise ValueError(f"families: unknown {unknown or 'empty list'}; "
                         f"choose from {', '.join(SYNTHETIC_FAMILIES)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    rng = random.Random(seed)
    order = [chosen[i % len(chosen)] for i in range(num_samples)]
    rng.shuffle(order)
    columns: dict[str, list[str]] = {"instruction": [], "context": [], "response": [],
                                     "category": []}
    for family in order:
        instruction, context, response = _GENERATORS[family](rng)
        columns["instruction"].append(instruction)
        columns["context"].append(context)
        columns["response"].append(response)
        columns["category"].append(family)
    return Dataset.from_dict(columns, features=CONTRACT_FEATURES)
