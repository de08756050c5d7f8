"""How a selected module computes its forward pass and its delta gradient.

A selected weight ``W`` always holds ``cast(base + delta)`` at its selected entries (the weights stay merged in
place), so the forward pass is the stock computation on ``W``. The trainable state is the fp32 ``delta``, an
``nn.Parameter`` of ``k`` entries that the module carries as ``gallop_delta``; ``W`` itself never requires grad.
Its gradient comes from autograd:

* ``nn.Linear`` and transformers' ``Conv1D`` run ``SparseLinearFunction``: forward ``y = x W^T + b`` (``x W + b``
  for Conv1D) on the merged weight, saving ``x``; backward ``dx = dy W`` and
  ``ddelta = gallop_kernels.weight_grad_at(dy, x, indices)``, the weight gradient at the selected entries only.
* Any other module type (an embedding, a norm) runs its own forward with ``weight`` swapped for the output of
  ``InjectDeltaFunction``: the same tensor, whose backward gathers the dense weight gradient at the selected
  entries. That computes the module's dense weight gradient, once, for that tensor only.

The module's ``forward`` is replaced on the instance (``install``) and restored by ``uninstall``; its state dict
keys (the delta is left out of them: it is the SparseModel's state), type and weights are unchanged. ``guard``
makes a module refuse dtype casts, which would round the fp32 deltas and bases, and weight loads, which would
put the selected entries out of step with the deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gallop_kernels

from . import quantized

DELTA = "gallop_delta"  # the trainable fp32 delta (nn.Parameter) on each selected module
INDICES = "gallop_indices"  # its sorted flat indices (non-persistent buffer)
BASE = "gallop_base"  # the exact pretrained values at those indices, fp32 (non-persistent buffer)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections: a linear layer with the weight stored ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def kind_of(module: nn.Module) -> str:
    """``quantized`` (a bitsandbytes 4-bit or 8-bit layer), ``linear`` (stock ``nn.Linear`` forward), ``conv1d``
    (transformers' Conv1D) or ``generic``."""
    if quantized.is_quantized_linear(module):
        return "quantized"
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    return "generic"


class SparseLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` (``x W + b`` when ``transposed``) whose only trainable input is the delta at ``indices``.

    Inputs: ``x [..., in]``, the merged ``weight`` (``[out, in]``, or ``[in, out]`` transposed; never requires
    grad), an optional ``bias``, ``delta`` (fp32 ``[k]``), ``indices`` (``[k]`` flat indices into the weight), and
    ``cast_dtype`` (the autocast dtype, or None). Backward returns ``dx``, ``dbias`` when the bias requires grad,
    and ``ddelta = weight_grad_at(...)`` in fp32; no dense weight gradient survives it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, indices, transposed: bool, cast_dtype: torch.dtype | None):
        w = weight if cast_dtype is None else weight.to(cast_dtype)
        b = bias if bias is None or cast_dtype is None else bias.to(cast_dtype)
        if transposed:
            out = torch.matmul(x, w)
            if b is not None:
                out = out + b
        else:
            out = F.linear(x, w, b)
        ctx.save_for_backward(x, weight, indices)
        ctx.transposed = transposed
        ctx.cast_dtype = cast_dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, indices = ctx.saved_tensors
        dx = dbias = ddelta = None
        if ctx.needs_input_grad[0]:
            w = weight if ctx.cast_dtype is None else weight.to(ctx.cast_dtype)
            w = w.to(dy.dtype) if w.dtype != dy.dtype else w
            # one 2-D GEMM over all tokens (matmul on a 3-D non-contiguous dy would batch it, copying per row)
            dy2 = dy.reshape(-1, dy.shape[-1])
            dx = (dy2 @ (w.t() if ctx.transposed else w)).view(*dy.shape[:-1], -1)
        if ctx.needs_input_grad[2]:
            dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
        if ctx.needs_input_grad[3]:
            g = dy if dy.dtype == x.dtype else dy.to(x.dtype)
            ddelta = (
                gallop_kernels.weight_grad_at(x, g, indices, check_indices=False)
                if ctx.transposed
                else gallop_kernels.weight_grad_at(g, x, indices, check_indices=False)
            )
        return dx, None, dbias, ddelta, None, None, None


class InjectDeltaFunction(torch.autograd.Function):
    """Returns ``weight`` unchanged; its backward hands the gradient at ``indices`` (fp32) to ``delta``."""

    @staticmethod
    def forward(ctx, weight, delta, indices):
        ctx.save_for_backward(indices)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return None, gallop_kernels.gather(grad, indices, check_indices=False), None


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    indices: torch.Tensor,
    transposed: bool = False,
) -> torch.Tensor:
    """The forward of a selected linear layer (autocast-aware: casts like ``F.linear`` under autocast)."""
    if weight.requires_grad:
        raise RuntimeError(
            "a selected weight requires grad, but GaLLoP keeps dense weights frozen and trains their "
            "delta: do not set requires_grad on the weights of a SparseModel"
        )
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        cast_dtype = torch.get_autocast_dtype(device_type)
        x = x.to(cast_dtype)
        with torch.autocast(device_type, enabled=False):
            return SparseLinearFunction.apply(x, weight, bias, delta, indices, transposed, cast_dtype)
    return SparseLinearFunction.apply(x, weight, bias, delta, indices, transposed, None)


def _linear_forward(self: Any, input: torch.Tensor) -> torch.Tensor:
    return sparse_linear(input, self.weight, self.bias, getattr(self, DELTA), getattr(self, INDICES))


def _conv1d_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    size_out = x.size()[:-1] + (self.nf,)
    y = sparse_linear(
        x.reshape(-1, x.size(-1)), self.weight, self.bias, getattr(self, DELTA), getattr(self, INDICES), transposed=True
    )
    return y.view(size_out)


def _quantized_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return quantized.quantized_sparse_linear(x, self, getattr(self, DELTA), getattr(self, INDICES), getattr(self, BASE))


def _generic_forward(self: Any, *args, **kwargs):
    weight = self._parameters["weight"]
    if weight.requires_grad:
        raise RuntimeError(
            "a selected weight requires grad, but GaLLoP keeps dense weights frozen and trains their "
            "delta: do not set requires_grad on the weights of a SparseModel"
        )
    self._parameters["weight"] = InjectDeltaFunction.apply(weight, getattr(self, DELTA), getattr(self, INDICES))
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        self._parameters["weight"] = weight


_FORWARDS = {
    "linear": _linear_forward,
    "conv1d": _conv1d_forward,
    "generic": _generic_forward,
    "quantized": _quantized_forward,
}


class _SparseForward:
    """The ``forward`` a selected module gets: a small object rather than a bound method, so that ``copy.deepcopy``
    and pickle rebuild it bound to the copied module."""

    def __init__(self, module: nn.Module, kind: str) -> None:
        self.module = module
        self.kind = kind

    def __call__(self, *args, **kwargs):
        return _FORWARDS[self.kind](self.module, *args, **kwargs)


def has_own_forward(module: nn.Module) -> bool:
    """Whether ``module.forward`` was replaced on the instance (by us, accelerate's hooks, another adapter...)."""
    return "forward" in module.__dict__


def _drop_delta_key(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A selected module's state dict stays the model's own (what transformers' ``save_pretrained`` writes): the
    delta belongs to the SparseModel's state dict, and the weight already holds ``cast(base + delta)``."""
    state_dict.pop(prefix + DELTA, None)


def _refuse_load(module: nn.Module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Loading weights into a module that holds or contains a selected weight would leave its selected entries out
    of step with the deltas (the next step writes ``cast(base + delta)`` back over them): refused, before anything
    is loaded (the hook sits on every such module, so the load's root refuses first)."""
    raise RuntimeError(
        "this module's weights are managed by a SparseModel (its selected entries hold cast(base + delta)), so "
        "loading weights into it would put them out of step with the deltas: load an adapter with "
        "SparseModel.from_pretrained or sparse.load_state_dict, or call sparse.merge_and_unload() and load into the "
        "plain model"
    )


def check_keeps_dtypes(fn: Any, device: torch.device, what: str = "a SparseModel's model") -> None:
    """Raise (before anything changes) if the ``nn.Module._apply`` function ``fn`` changes a floating dtype: the
    deltas and bases must stay fp32 and the weights their dtype, or training would continue on rounded state."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if fn(torch.empty(0, dtype=dtype, device=device)).dtype != dtype:
            raise RuntimeError(
                f"{what} keeps its weights' dtypes and fp32 deltas: this call would turn {dtype} into another "
                f"dtype: cast the model before wrapping it, or call sparse.merge_and_unload() first and cast the "
                f"plain model it returns"
            )


class _GuardedApply:
    """The ``_apply`` a module holding GaLLoP state gets (on the instance, like ``_SparseForward``): device moves
    pass, dtype casts (``.half()``, ``.to(torch.bfloat16)``) raise before any tensor is touched."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, fn, recurse: bool = True):
        first = next(self.module.parameters(), None)
        check_keeps_dtypes(fn, first.device if first is not None else torch.device("cpu"))
        return type(self.module)._apply(self.module, fn, recurse)


def guard(module: nn.Module) -> None:
    """Make ``module`` (a selected module or one that contains one) refuse dtype casts and weight loads;
    ``unguard`` undoes it."""
    if "_apply" not in module.__dict__:
        module.__dict__["_apply"] = _GuardedApply(module)
        module.register_load_state_dict_pre_hook(_refuse_load)


def guard_containers(model: nn.Module) -> list[nn.Module]:
    """``guard`` every module of ``model`` that holds or contains a selected (installed) module; returns them."""
    named = dict(model.named_modules())
    paths = {""}
    for name, m in named.items():
        if is_installed(m):
            parts = name.split(".") if name else []
            paths.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    modules = [named[p] for p in paths if p in named]
    for m in modules:
        guard(m)
    return modules


def unguard(module: nn.Module) -> None:
    if isinstance(module.__dict__.get("_apply"), _GuardedApply):
        del module.__dict__["_apply"]
        hooks = module._load_state_dict_pre_hooks
        for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is _refuse_load]:
            del hooks[key]


def install(module: nn.Module, delta: nn.Parameter, indices: torch.Tensor, base: torch.Tensor) -> None:
    """Attach the delta state to ``module`` and route its forward through the sparse path."""
    module.register_parameter(DELTA, delta)
    module.register_buffer(INDICES, indices, persistent=False)
    module.register_buffer(BASE, base, persistent=False)
    module.register_state_dict_post_hook(_drop_delta_key)
    module.forward = _SparseForward(module, kind_of(module))


def uninstall(module: nn.Module) -> None:
    """Undo ``install``: the module's own forward, no delta state, no state-dict hooks."""
    module.__dict__.pop("forward", None)
    for name in (DELTA, INDICES, BASE):
        if hasattr(module, name):
            delattr(module, name)
    for key in [k for k, h in module._state_dict_hooks.items() if h is _drop_delta_key]:
        del module._state_dict_hooks[key]


def is_installed(module: nn.Module) -> bool:
    return hasattr(module, DELTA)


class SelectedWeight:
    """One selected weight, the one record of it: its name, its parameter, the modules owning it (several when
    tied), its fp32 delta, and (read from the owning module, so they follow device moves) its indices and base."""

    def __init__(self, name: str, weight: nn.Parameter, modules: list[nn.Module], delta: nn.Parameter) -> None:
        self.name = name
        self.weight = weight
        self.modules = modules
        self.delta = delta
        self.synced_version = -1  # the delta's version counter when it was last written into the weight

    @property
    def quantized(self) -> bool:
        """Whether the weight is a bitsandbytes layer's: its delta is applied in the forward, never written."""
        return quantized.is_quantized_linear(self.modules[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape (``[out, in]`` for a quantized layer)."""
        return quantized.shape_of(self.modules[0]) if self.quantized else tuple(self.weight.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the trained values take (a quantized layer's de-quantized dtype)."""
        return quantized.dense_dtype(self.modules[0]) if self.quantized else self.weight.dtype

    @property
    def indices(self) -> torch.Tensor:
        return getattr(self.modules[0], INDICES)

    @property
    def base(self) -> torch.Tensor:
        return getattr(self.modules[0], BASE)


def bad_writes(
    weights: Sequence[SelectedWeight], deltas: Sequence[torch.Tensor] | None = None, deltas_finite: bool = False
) -> list[str]:
    """The names of the weights into which ``cast(base + delta)`` (default: each one's own delta) would put NaN or
    Inf: a non-finite delta (not checked when ``deltas_finite``), or a merged value that overflows an fp16 weight.
    One device sync."""
    checks = []
    for i, w in enumerate(weights):
        d = w.delta.detach() if deltas is None else deltas[i]
        c = [] if deltas_finite else [torch.isfinite(d).all()]
        if w.weight.dtype == torch.float16:  # the one weight dtype a finite fp32 sum can overflow
            c.append(torch.isfinite((w.base + d).to(torch.float16)).all())
        checks.append(c)
    flat = [c for cs in checks for c in cs]
    if not flat or bool(torch.stack(flat).all()):
        return []
    return [w.name for w, cs in zip(weights, checks) if not all(bool(c) for c in cs)]


def owning_modules(model: nn.Module, names: list[str], params: dict[str, nn.Parameter]) -> dict[str, list[nn.Module]]:
    """name -> the modules holding the weight ``params[name]`` as their ``weight`` (several when tied); raises
    ValueError if a weight has none, or one of them has its forward replaced on the instance."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        w = module._parameters.get("weight")
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), [])
            if all(m is not module for m in owners[id(w)]):
                owners[id(w)].append(module)
    out = {}
    for name in names:
        mods = owners.get(id(params[name]), [])
        if not mods:
            raise ValueError(
                f"{name!r} is not the weight of any module, so GaLLoP cannot route its gradient; exclude "
                f"it from target_modules"
            )
        for m in mods:
            if has_own_forward(m):
                raise ValueError(
                    f"the module owning {name!r} has its forward replaced on the instance (accelerate "
                    f"hooks or another adapter); GaLLoP needs plain modules: load the model without "
                    f"offloading hooks"
                )
        out[name] = mods
    return out


def delta_tree(names: list[str]) -> nn.Module:
    """Empty containers mirroring each selected weight's module path (``deltas.model.layers.0...``), for the
    SparseModel to register the delta parameters in; raises ValueError for a name that cannot be a module path."""
    root = nn.Module()
    for name in names:
        parent = root
        for part in name.split(".")[:-1]:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                try:
                    parent.add_module(part, child)
                except KeyError as e:
                    raise ValueError(f"the parameter name {name!r} cannot be mirrored as a module path ({e})") from None
            parent = child
    return root
