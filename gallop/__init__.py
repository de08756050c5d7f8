"""gallop: GaLLoP sparse fine-tuning wired into Hugging Face models, on top of gallop_kernels."""

from gallop_kernels import __version__

from .calibrate import mean_gradients
from .config import GallopConfig
from .optim import SparseAdamW
from .selection import Selection, eligible_parameters, select
from .sparse import SparseModel

__all__ = [
    "GallopConfig",
    "mean_gradients",
    "select",
    "Selection",
    "eligible_parameters",
    "SparseModel",
    "SparseAdamW",
    "__version__",
]
