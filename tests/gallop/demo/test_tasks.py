"""gallop.demo.tasks and gallop.demo.evaluate's accuracy functions are compatibility shims (until gallop 0.4): the
names they re-export are the library's own objects."""

import gallop.data
import gallop.evaluation
import gallop.tasks
from gallop.demo import evaluate, tasks


def test_the_demo_shims_re_export_the_library_objects():
    for name in ("KNOWLEDGE", "SKILLS", "TASKS", "available_examples", "load_jsonl", "task_examples"):
        assert getattr(tasks, name) is getattr(gallop.tasks, name), name
    assert tasks.batches is gallop.data.batches
    for name in ("accuracy", "choice_logprobs", "exact_match"):
        assert getattr(evaluate, name) is getattr(gallop.evaluation, name), name
