"""The public functional API of gallop_kernels: the contract of every op, then validation and dispatch.

Every function validates its arguments first (without a device sync) and raises ``ValueError`` or ``TypeError``
naming the offending argument, leaving every tensor untouched. The training-path ops then call their backend
directly in eager mode (the custom-op dispatcher costs about 0.1 ms a call) and go through their
``torch.library`` custom op inside ``torch.compile`` (no graph break). ``select_topk`` always dispatches directly.
After an eager op wrote a tensor, its autograd version counter is advanced, whichever backend wrote it. Inside
``torch.compile`` the data-dependent checks (index range, NaN/Inf, shared memory) are skipped: they would need a
device sync or real addresses; the Triton kernels stay memory-safe regardless.

Memory layout, one rule for every op: the ``K``-length inputs (``indices``, ``base``) may have any strides (a
non-contiguous one is copied once, which costs less than the kernel that reads it); the dense tensors an op reads
or writes as one flat array (``src``, ``dst``, ``weight``, ``weight_grad``) and the fp32 buffers it writes or that
are the optimizer's state must be contiguous, else a ``ValueError`` names the argument and ``.contiguous()`` (a
silent copy of a weight would cost as much as the op). ``select_topk`` and ``weight_grad_at`` accept any layout.
An op never writes a tensor that requires grad while grad mode is on (``ValueError``: call it under
``torch.no_grad()``), on either backend.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from . import _validate, gather_scatter, sparse_adamw
from . import select_topk as select_topk_folder  # the folder: the name select_topk is the function below
from . import weight_grad_at as weight_grad_at_folder  # the folder; the name weight_grad_at is this module's op
from ._registry import implementation


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _increment_versions(*tensors: torch.Tensor | None) -> None:
    """Advance the version counter of tensors an eager op wrote: a Triton launch writes memory behind torch's back,
    and anything that watches versions (a lazy write-back, autograd's saved-tensor check) must see the change."""
    for t in tensors:
        if t is not None:
            torch.autograd.graph.increment_version(t)


def select_topk(
    grads: Sequence[torch.Tensor | None] | None,
    weights: Sequence[torch.Tensor],
    k: int,
    *,
    scorer: str = "gallop",
    eps: float = 1e-8,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Exact global top-k selection over a list of tensors, by score, without materializing the scores.

    Args:
        grads: ``T`` tensors (any float dtype) pairwise shaped like ``weights``, or ``None`` for the scorers
            that do not read gradients (``magnitude``, ``random``).
        weights: ``T`` tensors of any shape and float dtype, all on one device.
        k: how many elements to select over all tensors together, ``1 <= k <= sum(w.numel())``.
        scorer: the score of element ``i`` (always computed in fp32; larger is selected first):
            ``gallop`` ``|g_i| / (|w_i| + eps)`` · ``gradient`` ``|g_i|`` · ``magnitude`` ``-|w_i|`` (smallest
            weights first) · ``product`` ``|g_i * w_i|`` · ``random`` a counter-based hash of
            ``(seed, tensor position, flat index)``, identical on every backend. ``gallop_kernels.SCORERS``.
        eps: the ``gallop`` scorer's stabilizer (>= 0).
        seed: the ``random`` scorer's seed.

    Returns:
        ``T`` 1-D tensors on the weights' device: the selected flat indices of each tensor, sorted ascending and
        unique; int32 for tensors with fewer than ``2**31`` elements, else int64 (``index_dtype``). Exactly ``k``
        indices in total. Ties at the threshold go to the lower ``(tensor position, flat index)``, so the result
        is a pure function of the inputs, identical on every backend.

    Raises:
        ValueError / TypeError: bad arguments, or a NaN / Inf score (names the tensor position).
    """
    grads, weights, k, eps, seed = select_topk_folder.check_select_topk_args(grads, weights, k, scorer, eps, seed)
    return implementation("select_topk", weights[0].device)(grads, weights, k, scorer=scorer, eps=eps, seed=seed)


def sparse_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    nonfinite: str = "skip",
) -> None:
    """One AdamW step over compressed (flat) buffers, in place, with exactly ``torch.optim.AdamW``'s math.

    All four tensors are 1-D, contiguous, fp32, of one length ``K`` (the selected entries), and share no memory.
    With ``bc1 = 1 - beta1**step`` and ``bc2 = 1 - beta2**step``::

        param      *= 1 - lr * weight_decay                      (decoupled decay, toward 0)
        exp_avg     = exp_avg + (1 - beta1) * (grad - exp_avg)
        exp_avg_sq  = beta2 * exp_avg_sq + (1 - beta2) * grad**2
        param      -= (lr / bc1) * exp_avg / (sqrt(exp_avg_sq) / sqrt(bc2) + eps)

    (amsgrad=False, maximize=False). ``step`` is the 1-based step count of this update; ``eps`` must be > 0 (with
    ``eps = 0`` an entry whose gradient and second moment are 0 would get 0 / 0 = NaN). Scalars may be Python,
    numpy or 0-d tensor numbers.

    ``nonfinite``: when ``grad`` holds a NaN or Inf, ``"skip"`` (default) changes nothing and warns,
    ``"raise"`` raises ``FloatingPointError`` (changing nothing), ``"assume_finite"`` does not check (no device
    sync; for callers that checked already).
    """
    hyperparams = sparse_adamw.check_sparse_adamw_args(
        param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay
    )
    _validate.check_nonfinite_option(nonfinite)
    if nonfinite != "assume_finite" and not _validate.all_finite(grad):
        _nonfinite("grad holds NaN or Inf: the AdamW step was skipped (param and moments unchanged)", nonfinite)
        return
    args = (param, grad, exp_avg, exp_avg_sq, *hyperparams.values())
    if _compiling():
        sparse_adamw.sparse_adamw_op(*args)
    else:
        sparse_adamw.sparse_adamw_(*args)
        _increment_versions(param, exp_avg, exp_avg_sq)


def sparse_adamw_step_(
    weight: torch.Tensor,
    weight_grad: torch.Tensor,
    indices: torch.Tensor,
    base: torch.Tensor,
    delta: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    check_indices: bool = True,
    nonfinite: str = "skip",
) -> None:
    """Fused optimizer step for one weight tensor from its dense gradient: gather, AdamW, write-back.

    ``grad = fp32(weight_grad.view(-1)[indices])``; ``sparse_adamw_(delta, grad, exp_avg, exp_avg_sq, ...)``;
    ``weight.view(-1)[indices] = cast(base + delta)``. ``weight`` and ``weight_grad`` share one shape (any float
    dtype, contiguous); ``indices`` is 1-D int32/int64 of length ``K``, unique, in ``[0, weight.numel())``; ``base``
    1-D of length ``K`` (any float dtype); ``delta``, ``exp_avg``, ``exp_avg_sq`` 1-D contiguous fp32 of length
    ``K``; no two of them share memory.

    ``check_indices`` (default True) verifies the index range and uniqueness first (one reduction, one device
    sync); with False an out-of-range index is ignored by the Triton kernel (memory-safe, result undefined) and
    raises in the reference. ``nonfinite``: when the gathered gradient holds a NaN or Inf, or ``cast(base + delta)``
    after the update does (an overflow of ``weight.dtype``, e.g. fp16 above 65504), ``"skip"`` (default) changes
    nothing (weight, delta and moments) and warns, ``"raise"`` raises ``FloatingPointError`` (changing nothing),
    ``"assume_finite"`` runs the one fused kernel without checking (no device sync; what training calls). The
    checked modes run the same math as the fused kernel, in three launches and one device sync, bit for bit.
    """
    hyperparams = sparse_adamw.check_sparse_adamw_step_args(
        weight,
        weight_grad,
        indices,
        base,
        delta,
        exp_avg,
        exp_avg_sq,
        step,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        check_indices,
        nonfinite,
    )
    indices, base = _validate.dense(indices), _validate.dense(base)
    if _compiling():
        sparse_adamw.sparse_adamw_step_op(
            weight, weight_grad, indices, base, delta, exp_avg, exp_avg_sq, *hyperparams.values()
        )
    elif nonfinite == "assume_finite":
        sparse_adamw.sparse_adamw_step_(
            weight, weight_grad, indices, base, delta, exp_avg, exp_avg_sq, *hyperparams.values()
        )
        _increment_versions(weight, delta, exp_avg, exp_avg_sq)
    else:
        _checked_sparse_adamw_step(
            weight, weight_grad, indices, base, delta, exp_avg, exp_avg_sq, hyperparams, nonfinite
        )


def gather(
    src: torch.Tensor,
    indices: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    check_indices: bool = True,
) -> torch.Tensor:
    """``out = fp32(src.reshape(-1)[indices])`` (or ``out += ...`` with ``accumulate=True``).

    Args:
        src: any shape, any float dtype.
        indices: 1-D int32/int64 flat indices into ``src``, each in ``[0, src.numel())``.
        out: optional 1-D contiguous fp32 tensor of ``len(indices)``, sharing no memory with ``src``; allocated
            when ``None``.
        accumulate: add into ``out`` instead of overwriting it.
        check_indices: verify the index range first (one reduction, one device sync). With False an out-of-range
            index reads 0 on the Triton backend (never memory outside ``src``) and raises in the reference.

    Returns:
        ``out`` (fp32, shape ``[len(indices)]``).
    """
    gather_scatter.check_gather_args(src, indices, out, check_indices)
    indices = _validate.dense(indices)
    if accumulate and out is None:
        raise ValueError("accumulate=True needs an out tensor to add into; pass out=...")
    if out is None:
        return (gather_scatter.gather_op if _compiling() else gather_scatter.gather)(src, indices)
    if _compiling():
        gather_scatter.gather_into_op(src, indices, out, bool(accumulate))
    else:
        gather_scatter.gather_into_(src, indices, out, bool(accumulate))
        _increment_versions(out)
    return out


def scatter_(
    dst: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    *,
    base: torch.Tensor | None = None,
    check_indices: bool = True,
    nonfinite: str = "skip",
) -> None:
    """``dst.view(-1)[indices] = cast(base + values)``, or ``cast(values)`` without ``base``, in place.

    Args:
        dst: contiguous, any shape, any float dtype (the weight).
        indices: 1-D int32/int64 flat indices into ``dst``, unique, each in ``[0, dst.numel())``.
        values: 1-D contiguous fp32 of ``len(indices)`` (the fp32 delta).
        base: optional 1-D of ``len(indices)``, any float dtype (the exact pretrained values).
            The sum is computed in fp32 and rounded once to ``dst.dtype`` (round to nearest even).
        check_indices: verify range and uniqueness first (one reduction, one device sync). With False an
            out-of-range index is never written by the Triton kernel (and raises in the reference); duplicates
            then leave an undefined one of their values.
        nonfinite: when ``cast(base + values)`` holds a NaN or Inf (including an overflow of ``dst.dtype``, e.g.
            fp16 above 65504), ``"skip"`` (default) writes nothing and warns, ``"raise"`` raises
            ``FloatingPointError``, ``"assume_finite"`` writes without checking.
    No argument may share memory with ``dst``.
    """
    gather_scatter.check_scatter_args(dst, indices, values, base, check_indices, nonfinite)
    indices, base = _validate.dense(indices), _validate.dense(base)
    if nonfinite != "assume_finite":
        written = (values if base is None else base.to(torch.float32) + values).to(dst.dtype)
        if not _validate.all_finite(written):
            _nonfinite(f"cast(base + values) to {dst.dtype} holds NaN or Inf: nothing was written", nonfinite)
            return
    if _compiling():
        gather_scatter.scatter_op(dst, indices, values, base)
    else:
        gather_scatter.scatter_(dst, indices, values, base)
        _increment_versions(dst)


def scatter_grouped_(
    dsts: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    *,
    bases: Sequence[torch.Tensor] | None = None,
    check_indices: bool = True,
    nonfinite: str = "skip",
) -> None:
    """``scatter_`` into ``T`` tensors in one call: ``dsts[i].view(-1)[indices[i]] = cast(bases[i] + values[i])``
    (or ``cast(values[i])`` without ``bases``) for every ``i``, in place. The write-back after a training step.

    Args:
        dsts: ``T`` contiguous tensors of any shape and float dtype (the weights; the dtypes may differ).
        indices: ``T`` 1-D int32/int64 flat indices, ``indices[i]`` unique and in ``[0, dsts[i].numel())``.
        values: ``T`` 1-D contiguous fp32 tensors, ``len(values[i]) == len(indices[i])`` (the fp32 deltas).
        bases: ``None``, or ``T`` 1-D tensors of ``len(indices[i])``, any float dtype (the exact pretrained values).
            Each sum is computed in fp32 and rounded once to ``dsts[i].dtype`` (round to nearest even).
        check_indices: verify every range and uniqueness first (one device sync for the group). With False an
            out-of-range index is never written by the Triton kernel (and raises in the reference); duplicates
            then leave an undefined one of their values.
        nonfinite: when any ``cast(bases[i] + values[i])`` holds a NaN or Inf (an overflow of ``dsts[i].dtype``
            included), ``"skip"`` (default) writes nothing into any tensor and warns, ``"raise"`` raises
            ``FloatingPointError`` (both name the first such position), ``"assume_finite"`` writes without checking.

    Every entry is written bit for bit as ``scatter_(dsts[i], indices[i], values[i], base=bases[i])`` writes it;
    a NaN stays a NaN (its payload bits are implementation-defined, as ``scatter_``'s). No ``dsts[i]`` may share
    memory with any other tensor of the call (a weight appears once); the read-only ``indices``, ``values`` and
    ``bases`` of different entries may share memory. The Triton backend makes one launch per distinct
    (``dsts[i]``, ``indices[i]``, ``bases[i]``) dtype triple, whatever ``T``; an empty group does nothing.
    """
    gather_scatter.check_scatter_grouped_args(dsts, indices, values, bases, check_indices, nonfinite)
    dst_list, value_list = list(dsts), list(values)
    index_list = [_validate.dense(i) for i in indices]
    base_list = None if bases is None else [_validate.dense(b) for b in bases]
    if nonfinite != "assume_finite" and dst_list and not _compiling():  # data-dependent, as all_finite
        finite = [
            torch.isfinite((v if base_list is None else base_list[i].to(torch.float32) + v).to(d.dtype)).all()
            for i, (d, v) in enumerate(zip(dst_list, value_list))
        ]
        flags = torch.stack(finite).tolist()  # one device sync for the group
        if not all(flags):
            bad = flags.index(False)
            what = f"values[{bad}]" if base_list is None else f"bases[{bad}] + values[{bad}]"
            _nonfinite(
                f"cast({what}) to {dst_list[bad].dtype} holds NaN or Inf: nothing was written into any of the "
                f"{len(dst_list)} tensors",
                nonfinite,
            )
            return
    if _compiling():
        gather_scatter.scatter_grouped_op(dst_list, index_list, value_list, base_list or [])
    else:
        gather_scatter.scatter_grouped_(dst_list, index_list, value_list, base_list or [])
        _increment_versions(*dst_list)


def weight_grad_at(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    indices: torch.Tensor,
    *,
    check_indices: bool = True,
    path: str = "auto",
) -> torch.Tensor:
    """The weight gradient of a linear layer at selected entries only: ``(G^T X).view(-1)[indices]`` in fp32.

    Args:
        grad_output: ``[..., M]`` (the gradient of the layer's output ``y = X W^T``), any float dtype.
        input: ``[..., N]`` (the layer's input ``X``), the same dtype and the same leading (token) dimensions.
        indices: 1-D int32/int64 flat indices into the ``[M, N]`` weight gradient, each in ``[0, M * N)``.
        check_indices: verify the index range first (one reduction, one device sync).
        path: ``dense`` (the GEMM ``G^T X`` in the inputs' dtype, then a gather: ``M*N*T`` multiply-adds),
            ``sampled`` (a sampled dense-dense product over the selected entries only: ``K*T``), or ``auto``
            (default): ``sampled`` when ``K`` is at most ``weight_grad_at.SAMPLED_MAX_DENSITY[device]`` of ``M*N``.

    Returns:
        fp32 ``[len(indices)]``: ``out[i] = sum_t G[t, r] * X[t, c]`` with ``(r, c) = divmod(indices[i], N)``, the
        tokens ``t`` running over all leading dimensions. For a ``[N, M]`` weight stored transposed (transformers'
        ``Conv1D``), pass ``(input, grad_output)``.

    Both paths accumulate in fp32 and round each entry once to the inputs' dtype (as torch's linear backward does;
    the dense path's GEMM, the sampled path explicitly), so they differ only by summation order, and an entry that
    overflows the inputs' dtype (fp16 above 65504) is inf on both.
    """
    weight_grad_at_folder.check_weight_grad_at_args(grad_output, input, indices, check_indices, path)
    m, n = grad_output.shape[-1], input.shape[-1]
    chosen = weight_grad_at_folder.choose_path(path, indices.numel(), m, n, grad_output.device)
    op = weight_grad_at_folder.weight_grad_at_op if _compiling() else weight_grad_at_folder.weight_grad_at
    return op(grad_output, input, indices, chosen)


def _checked_sparse_adamw_step(
    weight, weight_grad, indices, base, delta, exp_avg, exp_avg_sq, hyperparams: dict, nonfinite: str
):
    """``sparse_adamw_step_`` with its finiteness checks: gather, AdamW on copies of the state, check what would be
    written, then commit. The same kernels' math as the fused step, so the same bits."""
    grad = gather_scatter.gather(weight_grad, indices)
    if not _validate.all_finite(grad):
        _nonfinite("weight_grad holds NaN or Inf at the selected entries: the step was skipped", nonfinite, 4)
        return
    new_delta, new_m, new_v = delta.clone(), exp_avg.clone(), exp_avg_sq.clone()
    sparse_adamw.sparse_adamw_(new_delta, grad, new_m, new_v, *hyperparams.values())
    if not _validate.all_finite((base.to(torch.float32) + new_delta).to(weight.dtype)):
        _nonfinite(
            f"cast(base + delta) to {weight.dtype} holds NaN or Inf after the update (an overflow of the weight's "
            f"dtype: lower the learning rate): the step was skipped",
            nonfinite,
            4,
        )
        return
    delta.copy_(new_delta)
    exp_avg.copy_(new_m)
    exp_avg_sq.copy_(new_v)
    gather_scatter.scatter_(weight, indices, delta, base)
    _increment_versions(weight)


def _nonfinite(message: str, nonfinite: str, stacklevel: int = 3) -> None:
    if nonfinite == "raise":
        raise FloatingPointError(message + " (nonfinite='skip' skips instead of raising)")
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
