"""A small built-in suite of generated, deterministic multiple-choice tasks, and their tokenization.

Each task generates its examples from fixed seeds; an example belongs to the ``test`` split when the CRC32 of its
prompt is divisible by 5, else to ``train``, so the splits are disjoint and identical on every machine.
Training uses the answer tokens only (the prompt is masked out of the labels); evaluation picks the choice with
the highest log-likelihood (``gallop.demo.evaluate``).
"""

from __future__ import annotations

import json
import random
import string
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Example:
    """A multiple-choice example: the prompt, its choices and the index of the right one."""

    prompt: str
    choices: tuple[str, ...]
    label: int

    @property
    def answer(self) -> str:
        return self.choices[self.label]


def _fmt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _shuffled(rng: random.Random, right: str, wrong: Sequence[str]) -> tuple[tuple[str, ...], int]:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return tuple(choices), choices.index(right)


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


_GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "parity": _parity,
    "compare": _compare,
    "next_letter": _next_letter,
    "addition": _addition,
    "sentiment": _sentiment,
}
TASKS = tuple(_GENERATORS)


def _is_test(ex: Example) -> bool:
    return zlib.crc32(ex.prompt.encode()) % 5 == 0


def task_examples(name: str, split: str = "train", n: int = 64) -> list[Example]:
    """``n`` distinct examples of a built-in task from one split (``train`` or ``test``), deterministic."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(zlib.crc32(f"gallop/{name}".encode()))
    want_test = split == "test"
    seen: set[str] = set()
    out: list[Example] = []
    for _ in range(200 * n + 10_000):
        ex = _GENERATORS[name](rng)
        if ex.prompt in seen or _is_test(ex) != want_test:
            continue
        seen.add(ex.prompt)
        out.append(ex)
        if len(out) == n:
            return out
    raise ValueError(f"task {name!r} has only {len(out)} distinct {split} examples; ask for n <= {len(out)}")


def load_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file: ``{"prompt", "answer"}`` or ``{"prompt", "choices", "label"}`` per line.

    A ``{"prompt", "answer"}`` line becomes a one-choice example (trainable; accuracy is not meaningful).
    """
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: each line needs a string 'prompt'")
            if "choices" in row:
                choices, label = row["choices"], row.get("label")
                if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
                    raise ValueError(f"{path}:{lineno}: 'choices' must be a non-empty list of strings")
                if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
                    raise ValueError(f"{path}:{lineno}: 'label' must be an int index into 'choices'")
                out.append(Example(row["prompt"], tuple(choices), label))
            elif isinstance(row.get("answer"), str):
                out.append(Example(row["prompt"], (row["answer"],), 0))
            else:
                raise ValueError(f"{path}:{lineno}: needs 'answer' (a string) or 'choices' and 'label'")
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def encode(tokenizer, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + " " + continuation`` and how many of them belong to the prompt."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + " " + continuation, add_special_tokens=False)["input_ids"]
    n_prompt = len(p) if full[: len(p)] == p else len(p) - 1  # a merge across the boundary moves one token
    return full, max(0, min(n_prompt, len(full) - 1))


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pid is None else int(pid)


def collate(tokenizer, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """A right-padded training batch: ``input_ids``, ``attention_mask`` and ``labels`` (answer tokens only)."""
    rows = []
    for ex in examples:
        ids, n_prompt = encode(tokenizer, ex.prompt, ex.answer)
        eos = tokenizer.eos_token_id
        if eos is not None:
            ids = ids + [int(eos)]
        rows.append((ids, n_prompt))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        labels[r, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batches(
    tokenizer, examples: Sequence[Example], batch_size: int, *, epochs: int = 1, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches over ``examples``, reshuffled (deterministically from ``seed``) every epoch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield collate(tokenizer, [examples[j] for j in order[i : i + batch_size]])
