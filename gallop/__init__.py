"""gallop: GaLLoP sparse fine-tuning wired into Hugging Face models, on top of gallop_kernels."""

from .calibrate import mean_gradients
from .config import GallopConfig
from .selection import Selection, eligible_parameters, select

__all__ = ["GallopConfig", "mean_gradients", "select", "Selection", "eligible_parameters"]
__version__ = "0.1.0"
