"""GallopConfig: what to select and how."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from gallop_kernels import SCORERS, check_int, check_real

#: the selection budgets: one top-k over the whole model, or the same density in every tensor
BUDGETS = ("global", "per_tensor")
# the order matters to transformers' HfArgumentParser, which reads it as one ``str`` argument (no tuple here: it
# cannot parse one; a tuple is still accepted and stored as a list)
ModulePattern = list[str] | str | None
_SUFFIX_LIST = re.compile(r"[\w.]+(\s*,\s*[\w.]+)+")


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
            ``Conv1D``) except the output head. A list of name suffixes (``["q_proj", "v_proj"]``, or the string
            ``"q_proj,v_proj"``) or a regex string matched against the full module name, as in PEFT.
        exclude_modules: modules removed from the targets (suffix list or regex string).
        seed: seed of the ``random`` scorer.
        num_selected: select exactly this many entries (global budget), overriding ``density``: e.g. to match
            another method's trainable-parameter count.

    The density is relative to the *eligible* weights (by default the linear layers' weights without the head),
    not to all parameters; ``Selection.density_of_all`` gives the other basis.
    """

    density: float = field(default=0.01, metadata={"help": "fraction of the eligible weights to train, in (0, 1]"})
    scorer: str = field(
        default="gallop",
        metadata={
            "help": "gallop |g|/(|w|+eps), gradient |g|, magnitude (smallest |w|), product |g*w|, random",
            "choices": list(SCORERS),
        },
    )
    eps: float = field(default=1e-8, metadata={"help": "the gallop score's stabilizer"})
    budget: str = field(
        default="global",
        metadata={"help": "one top-k over the model (global) or per tensor", "choices": list(BUDGETS)},
    )
    target_modules: ModulePattern = field(
        default=None,
        metadata={"help": "regex over module names, or a comma list of suffixes (default: every Linear but the head)"},
    )
    exclude_modules: ModulePattern = field(
        default=None, metadata={"help": "modules removed from the targets: regex, or a comma list of suffixes"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random scorer (and of training, in gallop finetune)"})
    num_selected: int | None = field(
        default=None, metadata={"help": "select exactly this many entries (global budget), overriding density"}
    )

    def __post_init__(self) -> None:
        self.density = check_real("density", self.density, low=0.0, low_open=True, high=1.0)
        if not isinstance(self.scorer, str) or self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of the strings {', '.join(SCORERS)}, got {self.scorer!r}")
        self.eps = check_real("eps", self.eps, low=0.0)
        if not isinstance(self.budget, str) or self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of the strings {', '.join(BUDGETS)}, got {self.budget!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) and _SUFFIX_LIST.fullmatch(value):  # "q_proj,v_proj": a list of suffixes
                value = [v.strip() for v in value.split(",")]
            elif isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as e:
                    raise ValueError(
                        f"{name} is not a valid regular expression ({e}): {value!r}; pass a regex or a "
                        f"list of module-name suffixes such as ['q_proj', 'v_proj']"
                    ) from None
                continue
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise TypeError(f"{name} must be None, a regex string or a list of module-name suffixes, got {value!r}")
            setattr(self, name, list(value))
        self.seed = check_int("seed", self.seed)
        if self.num_selected is not None:
            self.num_selected = check_int("num_selected", self.num_selected, low=1, what="or None to use density")
            if self.budget != "global":
                raise ValueError("num_selected fixes the global budget's k; use density with budget='per_tensor'")

    @property
    def uses_gradients(self) -> bool:
        """Whether the scorer reads calibration gradients."""
        return SCORERS[self.scorer]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> GallopConfig:
        """The config from ``to_dict()``'s output; unknown keys are ignored, missing ones take their defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"a GallopConfig is stored as a JSON object of its fields, got a {type(d).__name__}")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
