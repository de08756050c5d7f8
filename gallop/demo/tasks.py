"""Compatibility shim: the built-in tasks live in ``gallop.tasks`` (the library's CLI reads them without the demo)
and ``batches`` in ``gallop.data``; this module goes in gallop 0.4."""

from ..data import batches as batches
from ..tasks import KNOWLEDGE as KNOWLEDGE
from ..tasks import SKILLS as SKILLS
from ..tasks import TASKS as TASKS
from ..tasks import available_examples as available_examples
from ..tasks import load_jsonl as load_jsonl
from ..tasks import task_examples as task_examples
