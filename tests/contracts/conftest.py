"""The cross-cutting contracts (reliability, memory safety, properties, crash safety): each file's docstring names
the modules it covers. The model-level ones share tests/gallop's isolation of the Trainer's process-wide state."""

from ..gallop.conftest import isolated_trainer_state  # noqa: F401  (an autouse fixture)
