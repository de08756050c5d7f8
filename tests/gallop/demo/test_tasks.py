"""The built-in generated tasks and JSONL loading."""

import pytest

from gallop.demo.tasks import TASKS, load_jsonl, task_examples


# ------------------------------------------------------------------------------------------------ tasks
@pytest.mark.parametrize("name", TASKS)
def test_tasks_deterministic_and_disjoint(name):
    a = task_examples(name, "train", 40)
    assert a == task_examples(name, "train", 40)
    test = task_examples(name, "test", 40)
    assert not {e.prompt for e in a} & {e.prompt for e in test}
    assert all(0 <= e.label < len(e.choices) for e in a + test)
    assert len({e.label for e in a}) > 1  # the right answer is not always in one place


def test_task_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        task_examples("trivia")
    with pytest.raises(ValueError, match="split must be"):
        task_examples("parity", "dev")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="needs 'answer'"):
        load_jsonl(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "2+2=", "answer": "4"}\n{"prompt": "Pick", "choices": ["a", "b"], "label": 1}\n')
    ex = load_jsonl(good)
    assert ex[0].answer == "4" and ex[1].answer == "b"
