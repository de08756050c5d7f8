"""GallopConfig: what to select and how."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from gallop_kernels import SCORERS

BUDGETS = ("global", "per_tensor")
ModulePattern = str | list[str] | tuple[str, ...] | None


@dataclass
class GallopConfig:
    """Configuration of GaLLoP selection.

    Attributes:
        density: fraction of the eligible weights to train, in (0, 1]. ``k = round(density * eligible)``.
        scorer: ``gallop`` |g|/(|w|+eps) (the paper) · ``gradient`` |g| (SAFT) · ``magnitude`` smallest |w|
            (PaFi) · ``product`` |g*w| (SNIP-like) · ``random`` (a seeded hash: the random-mask control).
        eps: stabilizer of the ``gallop`` score.
        budget: ``global`` one top-k over the whole model (the paper) or ``per_tensor`` the same density in
            every tensor.
        target_modules: which modules' ``weight`` is eligible. ``None``: every ``nn.Linear`` (and transformers'
            ``Conv1D``) except the output head. A list of name suffixes (``["q_proj", "v_proj"]``) or a regex
            string matched against the full module name, as in PEFT.
        exclude_modules: modules removed from the targets (suffix list or regex string).
        seed: seed of the ``random`` scorer.
    """

    density: float = 0.01
    scorer: str = "gallop"
    eps: float = 1e-8
    budget: str = "global"
    target_modules: ModulePattern = None
    exclude_modules: ModulePattern = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            isinstance(self.density, bool)
            or not isinstance(self.density, (int, float))
            or not math.isfinite(self.density)
            or not 0 < self.density <= 1
        ):
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise TypeError(f"{name} must be None, a regex string or a list of module-name suffixes, got {value!r}")
            setattr(self, name, list(value))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    @property
    def uses_gradients(self) -> bool:
        """Whether the scorer reads calibration gradients."""
        return SCORERS[self.scorer]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GallopConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
