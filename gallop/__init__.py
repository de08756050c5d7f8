"""gallop: GaLLoP sparse fine-tuning wired into Hugging Face models, on top of gallop_kernels.

The public names load lazily (importing ``gallop`` costs nothing until one is used, so the CLI starts fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GallopConfig": "config",
    "mean_gradients": "calibrate",
    "select": "selection",
    "Selection": "selection",
    "GradientCandidates": "selection",
    "eligible_parameters": "selection",
    "SparseModel": "sparse",
    "SparseAdamW": "optim",
    "load_model": "models",
}
__all__ = [*_EXPORTS, "__version__"]  # the one list is _EXPORTS (the block below only informs type checkers)

if TYPE_CHECKING:  # for type checkers only ("x as x": re-exported)
    from .calibrate import mean_gradients as mean_gradients
    from .config import GallopConfig as GallopConfig
    from .models import load_model as load_model
    from .optim import SparseAdamW as SparseAdamW
    from .selection import GradientCandidates as GradientCandidates
    from .selection import Selection as Selection
    from .selection import eligible_parameters as eligible_parameters
    from .selection import select as select
    from .sparse import SparseModel as SparseModel


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from gallop_kernels import __version__

        return __version__
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gallop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
