"""A quantized base: bitsandbytes' 4-bit (``Linear4bit``, NF4 / FP4) and 8-bit (``Linear8bitLt``) linear layers.

The one home of everything quantization-specific (docs/architecture.md, "A quantized base"):

* **Which quantizations** (``QUANTIZATIONS``, ``bnb_config``, ``quantization_of``): ``nf4`` and ``int8`` load
  through transformers' ``BitsAndBytesConfig``; a model quantized any other way (GPTQ, AWQ, fp8, torchao, a GGUF
  kept in blocks) is refused before any work, naming what is supported.
* **The dense view** (``dequantized``): a quantized layer's weight as the ``[out, in]`` tensor it stands for, built
  as a temporary by bitsandbytes' own de-quantization. Eligibility, scores and the adapter's base fingerprint all
  see this tensor; nothing keeps a persistent copy of it.
* **Calibration** (``GradAtDequantized``): the layer's forward computes ``y = x deq(Wq)^T + b`` and its backward
  hands ``dW = dy^T x`` (fp32, the gradient with respect to the de-quantized weight) to a callback. No dense
  weight exists or requires grad.
* **Training** (``quantized_sparse_linear``, the one op a fused de-quantize + delta-apply kernel can replace):
  ``y = x W^T + b`` with ``W = deq(Wq)`` holding ``cast(base + delta)`` at the selected entries, a temporary;
  backward ``dx = dy W`` (``W`` rebuilt, not saved) and ``ddelta = gallop_kernels.weight_grad_at(dy, x, indices)``.
  The quantized storage is never written, so every untouched weight stays bit-identical.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gallop_kernels

QUANTIZATIONS = ("nf4", "int8")  # what load_model(quantization=...) and --quantization take
_KINDS = ("nf4", "fp4", "int8")  # what a bitsandbytes layer can hold (fp4 models made elsewhere are accepted)
_SUPPORTED = "bitsandbytes 4-bit (nf4, fp4) and 8-bit (int8) linear layers"


def check_quantization(quantization: Any) -> str | None:
    """``None`` or one of ``QUANTIZATIONS``, else a ValueError naming what is supported."""
    if quantization is None or quantization in QUANTIZATIONS:
        return quantization
    raise ValueError(
        f"quantization must be one of {', '.join(QUANTIZATIONS)} (bitsandbytes, through transformers' "
        f"BitsAndBytesConfig) or None, got {quantization!r}; GPTQ, AWQ, fp8, torchao and GGUF-kept-quantized "
        f"bases are not supported"
    )


def bnb_config(quantization: str, compute_dtype: torch.dtype = torch.float32) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``"nf4"`` (4-bit NF4, de-quantized to ``compute_dtype``) or
    ``"int8"`` (LLM.int8); raises ImportError naming the package when bitsandbytes is missing."""
    check_quantization(quantization)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(
            f"quantization={quantization!r} needs bitsandbytes: pip install 'bitsandbytes>=0.50.2'"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (found by class, without importing
    bitsandbytes, which a dense model never needs)."""
    cls = type(module)
    return cls.__module__.startswith("bitsandbytes") and any(
        c.__name__ in ("Linear4bit", "Linear8bitLt") for c in cls.__mro__
    )


def kind_of(module: nn.Module) -> str:
    """``nf4``, ``fp4`` or ``int8``: how a bitsandbytes layer stores its weight."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return str(state.quant_type)
    if weight.dtype == torch.int8:
        return "int8"
    raise ValueError(
        f"a {type(module).__name__} whose weight is {weight.dtype} without a quantization state: quantize the model "
        f"when loading it (load_model(..., quantization='nf4'))"
    )


def quantization_of(model: nn.Module) -> str | None:
    """The model's quantization (``nf4``, ``fp4``, ``int8``), or None for a dense model.

    Raises ValueError for a model quantized any other way (GPTQ, AWQ, fp8, torchao, a GGUF kept in blocks), or mixing
    bitsandbytes kinds, before any work, naming what is supported.
    """
    kinds = {kind_of(m) for m in model.modules() if is_quantized_linear(m)}
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    method = getattr(method, "value", method)
    if method is not None and method != "bitsandbytes":
        raise ValueError(f"this model is quantized with {method!r}; GaLLoP supports {_SUPPORTED} only")
    packed = [
        (n, p.dtype)
        for mname, m in model.named_modules()
        if not is_quantized_linear(m)
        for n, p in m.named_parameters(prefix=mname, recurse=False)
        if not p.is_floating_point()
    ]
    if packed:
        raise ValueError(
            f"{packed[0][0]!r} is stored as {packed[0][1]} outside a bitsandbytes layer: GaLLoP supports {_SUPPORTED} "
            f"and dense weights only (load the model de-quantized, or with load_model(..., quantization='nf4'))"
        )
    if len(kinds) > 1:
        raise ValueError(f"this model mixes {sorted(kinds)} layers; GaLLoP supports one quantization per model")
    return next(iter(kinds)) if kinds else None


def shape_of(module: Any) -> tuple[int, int]:
    """The ``[out, in]`` shape a quantized layer's weight stands for."""
    return (int(module.out_features), int(module.in_features))


def dequantized(module: Any) -> torch.Tensor:
    """A new dense ``[out, in]`` tensor holding the layer's de-quantized weight, by bitsandbytes' own
    de-quantization: the 4-bit state's dtype for nf4 / fp4, fp32 for int8 (its row scales are fp32)."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return bnbf.dequantize_4bit(weight.data, state).reshape(shape_of(module))
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    if scales is None:
        raise ValueError(f"the {type(module).__name__} has no int8 row scales (SCB): it was not quantized on load")
    return bnbf.int8_vectorwise_dequant(weight.data, scales).reshape(shape_of(module))


def dense_dtype(module: Any) -> torch.dtype:
    """The dtype ``dequantized(module)`` returns (without de-quantizing)."""
    state = getattr(module.weight, "quant_state", None)
    return state.dtype if state is not None else torch.float32


# ------------------------------------------------------------------------------------------------ calibration
class GradAtDequantized(torch.autograd.Function):
    """``y = x deq(Wq)^T + b`` whose backward returns ``dx`` and calls ``on_grad(dW)`` with ``dW = dy^T x`` in fp32,
    the gradient with respect to the de-quantized weight (``on_grad=None``: the same forward and ``dx``, no ``dW``:
    a layer outside the current calibration slice). ``anchor`` (a scalar that requires grad) makes autograd
    run the backward even when nothing before the layer requires grad."""

    @staticmethod
    def forward(ctx, x, anchor, module, on_grad):
        w = dequantized(module).to(x.dtype)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        ctx.save_for_backward(x)
        ctx.module, ctx.on_grad = module, on_grad
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.on_grad is not None:
            ctx.on_grad(dy2.t().float() @ x.reshape(-1, x.shape[-1]).float())
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ dequantized(ctx.module).to(dy.dtype)).view(*dy.shape[:-1], -1)
        return dx, None, None, None


class CalibrationForward:
    """The ``forward`` a quantized eligible layer gets during ``mean_gradients`` (on the instance, removed after)."""

    def __init__(self, module: nn.Module, on_grad: Any) -> None:
        self.module = module
        self.on_grad = on_grad
        self.anchor = torch.zeros((), requires_grad=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
            with torch.autocast(device_type, enabled=False):
                return GradAtDequantized.apply(x, self.anchor, self.module, self.on_grad)
        return GradAtDequantized.apply(x, self.anchor, self.module, self.on_grad)


# ------------------------------------------------------------------------------------------------ training
def _merged_dense(module: nn.Module, delta: torch.Tensor, indices: torch.Tensor, base: torch.Tensor, dtype):
    """The temporary ``deq(Wq)`` in ``dtype`` holding ``cast(base + delta)`` at ``indices``."""
    w = dequantized(module).to(dtype)
    gallop_kernels.scatter_(w, indices, delta.detach(), base=base, check_indices=False, nonfinite="assume_finite")
    return w


class QuantizedSparseLinearFunction(torch.autograd.Function):
    """``y = x (deq(Wq) + S)^T + b``, ``S`` the fp32 ``delta`` at ``indices`` (merged as ``cast(base + delta)``).

    Backward: ``dx = dy W`` (``W`` rebuilt, not kept between forward and backward) and
    ``ddelta = weight_grad_at(dy, x, indices)`` in fp32.
    """

    @staticmethod
    def forward(ctx, x, delta, module, indices, base):
        w = _merged_dense(module, delta, indices, base, x.dtype)
        bias = None if module.bias is None else module.bias.to(x.dtype)
        ctx.save_for_backward(x, delta, indices, base)
        ctx.module = module
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        x, delta, indices, base = ctx.saved_tensors
        dx = ddelta = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[0]:
            w = _merged_dense(ctx.module, delta, indices, base, dy.dtype)
            dx = (dy2 @ w).view(*dy.shape[:-1], -1)
        if ctx.needs_input_grad[1]:
            g = dy if dy.dtype == x.dtype else dy.to(x.dtype)
            ddelta = gallop_kernels.weight_grad_at(g, x, indices, check_indices=False)
        return dx, ddelta, None, None, None


def quantized_sparse_linear(
    x: torch.Tensor, module: nn.Module, delta: torch.Tensor, indices: torch.Tensor, base: torch.Tensor
) -> torch.Tensor:
    """The forward of a selected quantized layer (the one op; autocast-aware: computes in the autocast dtype)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return QuantizedSparseLinearFunction.apply(x, delta, module, indices, base)
    return QuantizedSparseLinearFunction.apply(x, delta, module, indices, base)


# ------------------------------------------------------------------------------------------------ merging
def _dense_dtype_of(model: nn.Module) -> torch.dtype | None:
    """The most common dtype of the floating parameters outside bitsandbytes layers (e.g. fp16 for an int8 model
    that transformers loaded without a dtype), or None when there are none."""
    counts: dict[torch.dtype, int] = {}
    for m in model.modules():
        if is_quantized_linear(m):
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=lambda d: counts[d]) if counts else None


@torch.no_grad()
def dequantize_model(model: Any, dtype: torch.dtype | None = None) -> Any:
    """Replace every bitsandbytes layer of ``model`` by an ``nn.Linear`` holding its de-quantized weight (in
    ``dtype``; default: the dtype of the model's other floating weights, which the layers' inputs come in, else the
    layer's de-quantized dtype) and drop the model's quantization marks; returns ``model``."""
    if dtype is None:
        dtype = _dense_dtype_of(model)
    module: Any
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        w = dequantized(module)
        w = w.to(dtype or w.dtype)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=w.device)
        linear.to(w.dtype)
        linear.weight.data = w
        if module.bias is not None:
            linear.bias.data = module.bias.detach().to(w.dtype).clone()
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(module.bias.requires_grad)
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).add_module(child, linear)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    config: Any = getattr(model, "config", None)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return model


@contextlib.contextmanager
def calibration_forwards(
    modules: Mapping[str, nn.Module],
    on_grad: Callable[[str, torch.Tensor], None],
    wanted: Collection[str] | None = None,
) -> Iterator:
    """Inside: each quantized layer ``modules[name]`` computes its forward through ``GradAtDequantized``, handing
    ``dW`` to ``on_grad(name, dW)`` if ``name`` is in ``wanted`` (default: all). The layers not wanted keep the
    same forward (so a calibration in slices computes the one-pass loss and backward in every pass) but compute no
    ``dW``. On exit (also on error) every layer has its own forward back."""
    replaced = []
    try:
        for name, module in modules.items():
            if "forward" in module.__dict__:
                raise ValueError(
                    f"the layer owning {name!r} has its forward replaced on the instance (accelerate hooks, another "
                    f"adapter or a SparseModel); calibrate the plain quantized model"
                )
            report = functools.partial(on_grad, name) if wanted is None or name in wanted else None
            module.forward = CalibrationForward(module, report)
            replaced.append(module)
        yield
    finally:
        for module in replaced:
            module.__dict__.pop("forward", None)
