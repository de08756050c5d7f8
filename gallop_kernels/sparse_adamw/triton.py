"""Triton: AdamW over compressed (flat, k-length) fp32 buffers, and the fused gather + AdamW + write-back step.

Both kernels do torch.optim.AdamW's math in fp32 with IEEE-rounded sqrt and division (``sqrt_rn``,
``div_rn``), so they agree with the reference to a few ulp: FMA contraction differs, and so does the first moment's
form (``m + (1 - beta1) * (g - m)`` here; torch's ``lerp`` switches to ``g - (g - m) * beta1`` when the weight is
0.5 or more, i.e. for ``beta1 <= 0.5``). One program handles
``BLOCK`` consecutive entries; offsets are int64, so buffers may exceed 2**31 entries. Every tensor is read as
flat contiguous memory (the public API copies or refuses any other layout).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._tl import cast_rne

BLOCK = 1024


@triton.jit
def _adamw_math(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps):
    p = p * decay
    m = m + one_minus_beta1 * (g - m)  # torch.lerp(m, g, 1 - beta1) for 1 - beta1 < 0.5
    v = v * beta2 + (one_minus_beta2 * g) * g  # addcmul order: (value * t1) * t2, no early overflow
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def _adamw_buffers(
    p_ptr, m_ptr, v_ptr, g, offs, mask, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps
):
    """Load (param, exp_avg, exp_avg_sq) at ``offs``, apply one step with gradient ``g``, store; returns param."""
    p = tl.load(p_ptr + offs, mask=mask)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    p, m, v = _adamw_math(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    return p


@triton.jit
def _adamw_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    n,
    decay,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    step_size,
    bc2_sqrt,
    eps,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask)
    _adamw_buffers(
        p_ptr, m_ptr, v_ptr, g, offs, mask, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps
    )


@triton.jit
def _adamw_step_kernel(
    w_ptr,
    wg_ptr,
    idx_ptr,
    base_ptr,
    d_ptr,
    m_ptr,
    v_ptr,
    n,
    n_weight,
    decay,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    step_size,
    bc2_sqrt,
    eps,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    inside = mask & (idx >= 0) & (idx < n_weight)  # never touch memory outside the weight, whatever the indices
    g = tl.load(wg_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    d = _adamw_buffers(
        d_ptr, m_ptr, v_ptr, g, offs, mask, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps
    )
    base = tl.load(base_ptr + offs, mask=mask).to(tl.float32)
    tl.store(w_ptr + idx, cast_rne(base + d, w_ptr.dtype.element_ty), mask=inside)


def _scalars(step, lr, beta1, beta2, eps, weight_decay):
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    return dict(
        decay=1 - lr * weight_decay,
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        step_size=lr / bc1,
        bc2_sqrt=bc2**0.5,
        eps=eps,
    )


def sparse_adamw_(
    param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0
) -> None:
    """Triton twin of ``reference.sparse_adamw_`` (inputs validated by ``gallop_kernels.sparse_adamw_``)."""
    n = param.numel()
    if n == 0:
        return
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, n, **_scalars(step, lr, beta1, beta2, eps, weight_decay), BLOCK=BLOCK
    )


def sparse_adamw_step_(
    weight,
    weight_grad,
    indices,
    base,
    delta,
    exp_avg,
    exp_avg_sq,
    *,
    step,
    lr,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
) -> None:
    """Triton twin of ``reference.sparse_adamw_step_``: one kernel gathers, updates and writes back."""
    n = indices.numel()
    if n == 0:
        return
    _adamw_step_kernel[(triton.cdiv(n, BLOCK),)](
        weight,
        weight_grad,
        indices,
        base,
        delta,
        exp_avg,
        exp_avg_sq,
        n,
        weight.numel(),
        **_scalars(step, lr, beta1, beta2, eps, weight_decay),
        BLOCK=BLOCK,
    )
