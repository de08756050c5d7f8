"""The built-in tasks: generated, deterministic multiple-choice tasks (the CLI's ``--task`` / ``--tasks``, the
demo's quick path), as ``gallop.data.Example`` lists.

Two kinds, so that both learning and forgetting can show (``SKILLS``, ``KNOWLEDGE``; docs/experiments.md lists
each task's vanilla accuracy):

* **skills** a 135M model cannot do yet and can learn from a few hundred examples: ``parity``, ``compare``,
  ``next_letter``, ``addition``, ``sentiment``, ``last_letter``, ``alphabetical``;
* **knowledge** it already has, to measure forgetting on: ``capitals``, ``antonyms``, ``plurals``, ``sizes``,
  ``colors``, ``sounds``.

Each task generates its examples from fixed seeds; an example belongs to the ``test`` split when the CRC32 of its
prompt is divisible by 5, else to ``train``, so the splits are disjoint and identical on every machine. Training
uses the answer tokens only; evaluation picks the choice with the highest log-likelihood, or (generative) greedy
decoding and exact match (``gallop.evaluation``). Any other data goes through ``gallop.data.load_examples``.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable, Sequence

from .data import Example, load_examples


def _fmt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _shuffled(rng: random.Random, right: str, wrong: Sequence[str]) -> tuple[tuple[str, ...], int]:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return tuple(choices), choices.index(right)


def _pick(rng: random.Random, table: Sequence[tuple[str, str]], questions: Sequence[str], n_wrong: int = 3) -> Example:
    """A question (one of several phrasings) about one (key, answer) pair of ``table``; the wrong choices are other
    rows' answers."""
    key, right = rng.choice(table)
    others = sorted({a for _, a in table if a != right})
    choices, label = _shuffled(rng, right, rng.sample(others, min(n_wrong, len(others))))
    return Example(_fmt(rng.choice(questions).format(key)), choices, label)


# ------------------------------------------------------------------------------------------------ skills
def _parity(rng: random.Random) -> Example:
    n = rng.randrange(10, 1000)
    return Example(_fmt(f"Is {n} an even or an odd number?"), ("even", "odd"), n % 2)


def _compare(rng: random.Random) -> Example:
    a, b = rng.sample(range(10, 100), 2)
    return Example(_fmt(f"Which number is larger, {a} or {b}?"), (str(a), str(b)), int(b > a))


def _next_letter(rng: random.Random) -> Example:
    i = rng.randrange(0, 25)
    letters = string.ascii_lowercase
    wrong = rng.sample([c for j, c in enumerate(letters) if j != i + 1], 3)
    choices, label = _shuffled(rng, letters[i + 1], wrong)
    return Example(
        _fmt(f"Which letter comes right after '{letters[i]}' in the alphabet: {', '.join(choices)}?"), choices, label
    )


def _addition(rng: random.Random) -> Example:
    a, b = rng.randrange(10, 50), rng.randrange(10, 50)
    right = a + b
    wrong = rng.sample([right - 10, right - 1, right + 1, right + 10, right + 2, right - 2], 3)
    choices, label = _shuffled(rng, str(right), [str(w) for w in wrong])
    return Example(_fmt(f"What is {a} + {b}?"), choices, label)


_GOOD = (
    "wonderful",
    "excellent",
    "delightful",
    "superb",
    "brilliant",
    "lovely",
    "great",
    "charming",
    "fantastic",
    "enjoyable",
    "moving",
    "impressive",
)
_BAD = (
    "terrible",
    "awful",
    "boring",
    "dreadful",
    "disappointing",
    "dull",
    "horrible",
    "tedious",
    "poor",
    "weak",
    "annoying",
    "forgettable",
)
_NOUNS = ("movie", "book", "meal", "concert", "hotel", "game", "show", "album", "play", "service", "trip", "class")


def _sentiment(rng: random.Random) -> Example:
    positive = rng.random() < 0.5
    adj = rng.choice(_GOOD if positive else _BAD)
    noun = rng.choice(_NOUNS)
    adverb = rng.choice(("", "really ", "truly ", "quite "))
    return Example(
        _fmt(f'Review: "The {noun} was {adverb}{adj}." Is this review positive or negative?'),
        ("positive", "negative"),
        0 if positive else 1,
    )


_WORDS = (
    "apple",
    "river",
    "garden",
    "pencil",
    "window",
    "silver",
    "forest",
    "bottle",
    "candle",
    "rocket",
    "planet",
    "guitar",
    "basket",
    "mirror",
    "ladder",
    "pocket",
    "island",
    "hammer",
    "jacket",
    "butter",
    "carpet",
    "tunnel",
    "dragon",
    "violin",
    "orange",
    "summer",
    "winter",
    "spring",
    "autumn",
    "market",
    "bridge",
    "castle",
    "circle",
    "engine",
    "flower",
    "helmet",
    "kitten",
    "lemon",
    "magnet",
    "needle",
    "parrot",
    "rabbit",
    "saddle",
    "tomato",
)


def _last_letter(rng: random.Random) -> Example:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randrange(4, 8)))
    right = word[-1]
    wrong = rng.sample([c for c in string.ascii_lowercase if c != right], 3)
    choices, label = _shuffled(rng, right, wrong)
    return Example(_fmt(f"What is the last letter of the word '{word}'?"), choices, label)


def _alphabetical(rng: random.Random) -> Example:
    a, b = rng.sample(_WORDS, 2)
    return Example(_fmt(f"Which word comes first in alphabetical order, '{a}' or '{b}'?"), (a, b), int(b < a))


# ------------------------------------------------------------------------------------------------ knowledge
_CAPITALS = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("England", "London"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Canada", "Ottawa"),
    ("Thailand", "Bangkok"),
    ("Kenya", "Nairobi"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Turkey", "Ankara"),
    ("Belgium", "Brussels"),
    ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"),
    ("Hungary", "Budapest"),
    ("Cuba", "Havana"),
    ("Mexico", "Mexico City"),
    ("India", "New Delhi"),
    ("South Korea", "Seoul"),
    ("the Netherlands", "Amsterdam"),
    ("Czech Republic", "Prague"),
)
_ANTONYMS = (
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("high", "low"),
    ("old", "young"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("early", "late"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("full", "empty"),
    ("open", "closed"),
    ("long", "short"),
    ("heavy", "light"),
    ("thick", "thin"),
    ("clean", "dirty"),
    ("loud", "quiet"),
    ("true", "false"),
    ("win", "lose"),
    ("buy", "sell"),
    ("push", "pull"),
    ("first", "last"),
    ("love", "hate"),
    ("up", "down"),
    ("inside", "outside"),
    ("day", "night"),
    ("good", "bad"),
    ("begin", "end"),
)
_PLURALS = (
    ("child", "children"),
    ("mouse", "mice"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("man", "men"),
    ("woman", "women"),
    ("goose", "geese"),
    ("person", "people"),
    ("city", "cities"),
    ("box", "boxes"),
    ("leaf", "leaves"),
    ("knife", "knives"),
    ("baby", "babies"),
    ("bus", "buses"),
    ("wolf", "wolves"),
    ("story", "stories"),
    ("church", "churches"),
    ("potato", "potatoes"),
    ("life", "lives"),
    ("dish", "dishes"),
    ("fox", "foxes"),
    ("party", "parties"),
    ("half", "halves"),
    ("hero", "heroes"),
)
_SIZES = ("ant", "mouse", "cat", "dog", "horse", "elephant", "whale")
_SIZE_OBJECTS = (("a coin", 1), ("a book", 2), ("a chair", 3), ("a car", 4), ("a house", 5), ("a mountain", 6))
_COLORS = (
    ("the sky on a clear day", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("a banana", "yellow"),
    ("a ripe tomato", "red"),
    ("coal", "black"),
    ("an orange", "orange"),
    ("a lemon", "yellow"),
    ("milk", "white"),
    ("a strawberry", "red"),
    ("a leaf in summer", "green"),
    ("the night sky", "black"),
    ("a carrot", "orange"),
    ("the sea", "blue"),
    ("a crow", "black"),
    ("a polar bear", "white"),
)
_SOUNDS = (
    ("dog", "bark"),
    ("cat", "meow"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("lion", "roar"),
    ("sheep", "baa"),
    ("snake", "hiss"),
    ("pig", "oink"),
    ("horse", "neigh"),
    ("owl", "hoot"),
    ("bee", "buzz"),
    ("frog", "croak"),
    ("rooster", "crow"),
    ("mouse", "squeak"),
)


def _capitals(rng: random.Random) -> Example:
    return _pick(
        rng,
        _CAPITALS,
        ("What is the capital of {}?", "Which city is the capital of {}?", "Name the capital city of {}."),
    )


def _antonyms(rng: random.Random) -> Example:
    return _pick(
        rng,
        _ANTONYMS,
        ("What is the opposite of '{}'?", "Give the antonym of '{}'.", "Which word means the opposite of '{}'?"),
    )


def _plurals(rng: random.Random) -> Example:
    word, right = rng.choice(_PLURALS)
    wrong = sorted({word + "s", word + "es", word + "en"} - {right})
    choices, label = _shuffled(rng, right, rng.sample(wrong, 2))
    question = rng.choice(
        ("What is the plural of '{}'?", "What do you call more than one '{}'?", "Give the plural form of '{}'.")
    )
    return Example(_fmt(question.format(word)), choices, label)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sizes(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        i, j = sorted(rng.sample(range(len(_SIZES)), 2))
        a, b = (_SIZES[i], _SIZES[j]) if rng.random() < 0.5 else (_SIZES[j], _SIZES[i])
        bigger = _SIZES[j]
        q = f"Which animal is bigger, {_article(a)} {a} or {_article(b)} {b}?"
    else:
        (a, sa), (b, sb) = rng.sample(_SIZE_OBJECTS, 2)
        bigger = a if sa > sb else b
        q = f"Which is bigger, {a} or {b}?"
        a, b = a.split()[-1], b.split()[-1]
        bigger = bigger.split()[-1]
    return Example(_fmt(q), (a, b), int(bigger == b))


def _colors(rng: random.Random) -> Example:
    return _pick(rng, _COLORS, ("What color is {}?", "What is the color of {}?", "Which color is {}?"))


def _sounds(rng: random.Random) -> Example:
    return _pick(
        rng, _SOUNDS, ("What sound does a {} make?", "What noise does a {} make?", "Which sound is made by a {}?")
    )


SKILLS: dict[str, Callable[[random.Random], Example]] = {
    "parity": _parity,
    "compare": _compare,
    "next_letter": _next_letter,
    "addition": _addition,
    "sentiment": _sentiment,
    "last_letter": _last_letter,
    "alphabetical": _alphabetical,
}
KNOWLEDGE: dict[str, Callable[[random.Random], Example]] = {
    "capitals": _capitals,
    "antonyms": _antonyms,
    "plurals": _plurals,
    "sizes": _sizes,
    "colors": _colors,
    "sounds": _sounds,
}
_GENERATORS = {**SKILLS, **KNOWLEDGE}
TASKS = tuple(_GENERATORS)


def _in_split(name: str, ex: Example, split: str) -> bool:
    """Skills split by CRC32 of the prompt (1 in 5 is test); knowledge tasks are probes, never trained on in the
    experiments: both of their splits hold every example."""
    return name in KNOWLEDGE or (zlib.crc32(ex.prompt.encode()) % 5 == 0) == (split == "test")


def available_examples(name: str, split: str = "train", wanted: int = 10**4) -> int:
    """How many of ``wanted`` examples ``task_examples`` can return: a skill's distinct examples in ``split`` (counted
    up to ``wanted``); ``wanted`` for a knowledge task (its examples repeat)."""
    if name in KNOWLEDGE:
        return wanted
    if name not in SKILLS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return len(_distinct(name, split, wanted))


def _distinct(name: str, split: str, limit: int | None = None) -> list[Example]:
    rng = random.Random(zlib.crc32(f"gallop/{name}".encode()))
    seen: set[str] = set()
    out: list[Example] = []
    misses = 0
    while (limit is None or len(out) < limit) and misses < 2000:
        ex = _GENERATORS[name](rng)
        if ex.prompt in seen or not _in_split(name, ex, split):
            misses += ex.prompt in seen
            continue
        seen.add(ex.prompt)
        out.append(ex)
        misses = 0
    return out


def task_examples(name: str, split: str = "train", n: int = 64) -> list[Example]:
    """``n`` distinct examples of a built-in task from one split (``train`` or ``test``), deterministic. A
    knowledge task has fewer distinct examples than most requests: its examples repeat (in order) to fill ``n``."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    out = _distinct(name, split, n)
    if not out:
        raise ValueError(f"task {name!r} has no {split} examples")
    if name in SKILLS and len(out) < n:
        raise ValueError(f"task {name!r} has only {len(out)} distinct {split} examples; ask for n <= {len(out)}")
    return [out[i % len(out)] for i in range(n)] if len(out) < n else out


def load_jsonl(path) -> list[Example]:
    """Examples from a JSONL file in any format ``gallop.data`` reads (without a chat template)."""
    return load_examples(str(path))
