"""Training data for causal language models: records in the common formats, tokenized with completion-only labels.

Accepted record formats (one JSON object / dataset row each):

* ``{"prompt", "completion"}`` (TRL's format): the completion follows the prompt as is.
* ``{"messages": [{"role", "content"}, ...]}`` (chat): rendered with the tokenizer's chat template; the last
  assistant turn is the completion, everything before it (with the generation prompt) the prompt.
* ``{"prompt", "answer"}`` (gallop's): the answer follows the prompt after one space.
* ``{"prompt", "choices", "label"}`` (gallop's multiple choice): ``choices[label]`` is the answer; accuracy can be
  measured by comparing the choices' likelihoods.

Other column names map onto these with ``columns={"prompt": "question", "completion": "response"}``. Only the
completion's tokens (and the end-of-sequence token) are trained on; the prompt is masked out of the labels.

``DatasetArguments`` and ``DataArguments`` are the command line's data options (``gallop select``, ``gallop eval``,
and the demo's ``gallop finetune`` on top of them).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
FIELDS = ("prompt", "completion", "answer", "choices", "label", "messages")


@dataclass(frozen=True)
class Example:
    """A prompt with one or more candidate continuations, ``choices[label]`` the right one; ``sep`` joins them."""

    prompt: str
    choices: tuple[str, ...]
    label: int
    sep: str = " "

    @property
    def answer(self) -> str:
        return self.choices[self.label]


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pid is None else int(pid)


def encode(
    tokenizer, prompt: str, continuation: str, sep: str = " ", max_length: int | None = None
) -> tuple[list[int], int]:
    """Token ids of ``prompt + sep + continuation`` and how many of them belong to the prompt.

    With ``max_length``, the prompt loses tokens from its start first; a continuation longer than ``max_length - 1``
    keeps its first tokens (at least one prompt token is kept, since the first token is never predicted).
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + sep + continuation, add_special_tokens=False)["input_ids"]
    n_prompt = len(p) if full[: len(p)] == p else len(p) - 1  # a merge across the boundary moves one token
    n_prompt = max(0, min(n_prompt, len(full) - 1))
    if max_length is not None and len(full) > max_length:
        cut = min(len(full) - max_length, max(0, n_prompt - 1))
        full, n_prompt = full[cut:], n_prompt - cut
        full = full[:max_length]
    return full, n_prompt


def collate(tokenizer, examples: Sequence[Example], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """A right-padded training batch: ``input_ids``, ``attention_mask`` and ``labels`` (the answers' tokens and
    the end-of-sequence token; the prompts and the padding are -100)."""
    rows = []
    eos = tokenizer.eos_token_id
    for ex in examples:
        ids, n_prompt = encode(
            tokenizer, ex.prompt, ex.answer, ex.sep, None if max_length is None else max_length - (eos is not None)
        )
        if eos is not None:
            ids = [*ids, int(eos)]
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


class Collator:
    """``collate`` as a Trainer data collator over a list of ``Example`` (picklable, for dataloader workers)."""

    def __init__(self, tokenizer, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return collate(self.tokenizer, examples, self.max_length)


# ------------------------------------------------------------------------------------------------ the command line
@dataclass
class DatasetArguments:
    """A dataset on the command line: any source ``load_examples`` reads, the split, and the column names."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "a datasets.load_dataset spec: a local .json/.jsonl/.csv/.parquet file or folder, or a Hub "
            "dataset id; records as prompt/completion, messages (chat template), prompt/answer or "
            "prompt/choices/label"
        },
    )
    split: str = field(default="train", metadata={"help": "the dataset split to read"})
    prompt_column: str = field(default="prompt", metadata={"help": "the dataset column holding the prompt"})
    completion_column: str = field(default="completion", metadata={"help": "the column holding the completion"})
    messages_column: str = field(default="messages", metadata={"help": "the column holding chat messages"})

    def columns(self) -> dict[str, str]:
        """The ``columns`` mapping of ``load_examples``."""
        return {"prompt": self.prompt_column, "completion": self.completion_column, "messages": self.messages_column}


@dataclass
class DataArguments(DatasetArguments):
    """The data of a command that trains or calibrates: a built-in task (``gallop.tasks``) or ``--dataset``."""

    task: str = field(
        default="sentiment",
        metadata={"help": "a built-in task (see `gallop eval --help`); ignored when --dataset is given"},
    )


def dataset_label(spec: str) -> str:
    """A dataset's name in tables, metrics and plots: its folder or file stem (``~/data/sciq/`` and ``sciq.jsonl``
    are ``sciq``; a Hub id ``allenai/sciq`` is ``sciq``), never the full path."""
    return Path(spec.rstrip("/\\")).stem or "dataset"


# ------------------------------------------------------------------------------------------------ records
def _get(row: Mapping[str, Any], field: str, columns: Mapping[str, str]) -> Any:
    return row.get(columns.get(field, field))


def _chat_example(messages: Any, tokenizer, where: str) -> Example:
    if not (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    ):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or not str(messages[last]["content"]).strip():
        raise ValueError(f"{where}: the conversation has no assistant answer to train on")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{where}: chat 'messages' need a tokenizer with a chat template (this one has none): use "
            f"an instruction-tuned model's tokenizer, or give prompt/completion records"
        )
    prefix = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages[: last + 1], tokenize=False)
    completion = full[len(prefix) :] if full.startswith(prefix) else str(messages[last]["content"])
    return Example(prefix, (completion,), 0, sep="")


def to_example(
    row: Mapping[str, Any], tokenizer=None, columns: Mapping[str, str] | None = None, where: str = "record"
) -> Example:
    """One record (any format of the module docstring) as an ``Example``; ``where`` names it in errors."""
    columns = dict(columns or {})
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: a record must be an object with named fields, got {type(row).__name__}")
    messages = _get(row, "messages", columns)
    if messages is not None:
        return _chat_example(messages, tokenizer, where)
    prompt = _get(row, "prompt", columns)
    if not isinstance(prompt, str):
        raise ValueError(
            f"{where}: needs a string 'prompt' (or 'messages'); map another column with "
            f"columns={{'prompt': ...}} (--prompt-column)"
        )
    completion = _get(row, "completion", columns)
    if completion is not None:
        if not isinstance(completion, str) or not completion.strip():
            raise ValueError(f"{where}: 'completion' must be a non-empty string: a record needs an answer to train on")
        return Example(prompt, (completion,), 0, sep="")
    choices = _get(row, "choices", columns)
    if choices is not None:
        label = _get(row, "label", columns)
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise ValueError(f"{where}: 'choices' must be a non-empty list of strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise ValueError(f"{where}: 'label' must be an int index into 'choices'")
        return Example(prompt, tuple(choices), label)
    answer = _get(row, "answer", columns)
    if isinstance(answer, str) and answer.strip():
        return Example(prompt, (answer,), 0)
    raise ValueError(
        f"{where}: no answer: needs 'completion', 'answer', 'choices' with 'label', or 'messages' with an "
        f"assistant turn (map other column names with columns=... / --completion-column)"
    )


def check_dataset_spec(spec: str, argument: str = "spec") -> None:
    """Refuse (before anything loads) a dataset spec that names a local file that is missing, empty or of an unknown
    type; anything that looks like a Hub id (``owner/name``, no file suffix) passes. The error names ``argument``."""
    path = Path(spec).expanduser()
    if not spec.strip():
        raise ValueError(f"{argument} is empty: pass a .json/.jsonl/.csv/.parquet file or folder, or a Hub dataset id")
    if not path.exists():
        if spec.startswith((".", "/", "~")) or path.suffix.lower() in _FILE_BUILDERS or spec.count("/") > 1:
            raise FileNotFoundError(
                f"{argument} {spec!r} does not exist (relative paths are from {os.getcwd()!r}); a Hub dataset id "
                f"looks like 'owner/name'"
            )
        return
    if path.is_file():
        if path.suffix.lower() not in _FILE_BUILDERS:
            raise ValueError(
                f"{argument} {spec!r}: unknown file type {path.suffix!r}; use one of {', '.join(_FILE_BUILDERS)}"
            )
        if _only_whitespace(path):
            raise ValueError(f"{argument} {spec!r} is an empty file (nothing but whitespace): it has no records")


def _only_whitespace(path: Path) -> bool:
    """Whether the file holds nothing but whitespace (reads until the first other byte: one block for real data)."""
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return False
    return True


def load_records(spec: str, split: str = "train", **kwargs: Any) -> list[dict]:
    """Rows of a dataset: a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file or folder, or a Hub dataset id,
    through ``datasets.load_dataset`` (``kwargs`` are passed on, e.g. ``name=`` or ``revision=``)."""
    check_dataset_spec(spec)
    try:
        import datasets
    except ImportError:
        raise ImportError("reading datasets needs the datasets package: pip install datasets") from None
    path = Path(spec)
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"{spec}: unknown file type {path.suffix!r}; use one of {', '.join(_FILE_BUILDERS)}")
            ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
        else:
            ds = datasets.load_dataset(spec, split=split, **kwargs)
    except (
        OSError,
        ValueError,
        json.JSONDecodeError,
        datasets.exceptions.DatasetNotFoundError,
        datasets.exceptions.DatasetGenerationError,  # e.g. a JSON column mixing numbers and strings (datasets 3)
    ) as e:  # OSError: offline
        raise ValueError(f"cannot load the dataset {spec!r} (split {split!r}): {e}") from None
    return [dict(r) for r in ds]


def load_examples(
    spec: str, tokenizer=None, *, split: str = "train", columns: Mapping[str, str] | None = None, **kwargs: Any
) -> list[Example]:
    """``load_records`` then ``to_example`` on every row; an empty dataset is an error."""
    rows = load_records(spec, split, **kwargs)
    if not rows:
        raise ValueError(f"the dataset {spec!r} (split {split!r}) has no records")
    return [to_example(r, tokenizer, columns, where=f"{spec} record {i}") for i, r in enumerate(rows)]


def batches(
    tokenizer,
    examples: Sequence[Example],
    batch_size: int,
    *,
    epochs: int = 1,
    seed: int = 0,
    max_length: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches over ``examples``, reshuffled (deterministically from ``seed``) every epoch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield collate(tokenizer, [examples[j] for j in order[i : i + batch_size]], max_length)
