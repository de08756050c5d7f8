"""The built-in tasks: deterministic, disjoint splits for the skills, probes for the knowledge tasks."""

import pytest

from gallop.tasks import KNOWLEDGE, SKILLS, TASKS, load_jsonl, task_examples


@pytest.mark.parametrize("name", TASKS)
def test_tasks_are_deterministic_and_well_formed(name):
    a = task_examples(name, "train", 40)
    assert a == task_examples(name, "train", 40)
    test = task_examples(name, "test", 40)
    assert all(0 <= e.label < len(e.choices) and len(set(e.choices)) == len(e.choices) for e in a + test)
    assert len({e.label for e in a}) > 1  # the right answer is not always in one place
    if name in SKILLS:
        assert not {e.prompt for e in a} & {e.prompt for e in test}  # disjoint splits


def test_there_are_enough_tasks_of_each_kind():
    assert len(SKILLS) >= 4 and len(KNOWLEDGE) >= 4 and len(TASKS) >= 8


def test_task_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        task_examples("trivia")
    with pytest.raises(ValueError, match="split must be"):
        task_examples("parity", "dev")
    with pytest.raises(ValueError, match="has only"):
        task_examples("compare", "test", 10**6)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="no answer"):
        load_jsonl(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "2+2=", "answer": "4"}\n{"prompt": "Pick", "choices": ["a", "b"], "label": 1}\n')
    ex = load_jsonl(good)
    assert ex[0].answer == "4" and ex[1].answer == "b"
