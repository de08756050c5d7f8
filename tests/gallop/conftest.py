"""Every gallop (model-level) test module that uses ``backend`` runs once per kernel backend: the reference, and
the Triton kernels through the interpreter. A write-back that depends on what one backend does and the other
doesn't is exactly what that catches."""

import os
import sys

import pytest


@pytest.fixture(autouse=True)
def isolated_trainer_state():
    """Each test starts with the environment and accelerate's process-wide state it would have alone. A
    ``TrainingArguments(bf16=True)`` (TRL's default) sets ``ACCELERATE_MIXED_PRECISION=bf16`` in ``os.environ``
    (transformers 4.56), and every later Trainer in the process then ran under bf16 autocast: a test's result
    depended on which tests ran before it."""
    env = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(env)
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
