"""Every write path rounds fp32 to the weight's dtype exactly as torch's ``Tensor.to(dtype)`` does, on both
backends (issue 16): NaN payloads of either sign (GPUs produce ``0x7FFFFFFF``), signalling NaNs, +-inf, overflow
past the bf16/fp16 maximum, ties at the rounding boundaries, denormals of fp32 and of the target, +-0, and random
bit patterns. Every non-NaN result must match torch's bits exactly, and every NaN must stay a NaN: a NaN's own bits
are implementation-defined (torch's CPU path writes bf16 0xFFFF, CUDA's cvt 0x7FFF, gallop's bf16 cast 0x7FC0)."""

import pytest
import torch

import gallop_kernels as gk

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter

SPECIAL_BITS = [
    0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FA00000,  # NaNs
    0x7F800000, 0xFF800000,  # +-inf
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F7F0000,  # fp32 max; the bf16 overflow boundary
    0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x00800000, 0x00008000, 0x00018000,  # zeros, denormals
    0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF,  # bf16 ties to even, either side
]  # fmt: skip
FP16_EDGES = [65504.0, 65519.996, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 2.0**-14, 1.0 + 2.0**-11]


def _patterns() -> torch.Tensor:
    special = torch.tensor(SPECIAL_BITS, dtype=torch.int64).to(torch.int32)
    rand = torch.randint(-(2**31), 2**31, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    bits = torch.cat([special, torch.tensor(FP16_EDGES).view(torch.int32), rand.to(torch.int32)])
    return bits.view(torch.float32)


def _assert_same_cast(got: torch.Tensor, expected: torch.Tensor) -> None:
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan), "a NaN was not written as a NaN (or a number became NaN)"
    got, expected = got[~nan], expected[~nan]
    assert torch.equal(got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                       expected.view(torch.int16 if got.element_size() == 2 else torch.int32))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_base", [False, True])
def test_scatter_writes_what_torch_casts(backend, dtype, with_base):
    values = _patterns()
    n = values.numel()
    base = torch.zeros(n) if with_base else None
    dst = torch.full((n,), 7.0, dtype=dtype)
    gk.scatter_(dst, torch.arange(n), values, base=base, nonfinite="assume_finite")
    _assert_same_cast(dst, (values if base is None else base + values).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nonfinite", ["assume_finite", "skip"])
def test_the_fused_step_writes_what_torch_casts(backend, dtype, nonfinite):
    """lr = 0 and a zero gradient leave every delta as it is, so the step writes exactly cast(base + delta)."""
    delta = _patterns()
    if nonfinite == "skip":  # the checked path writes only finite results: keep the finite patterns
        delta = delta[torch.isfinite(delta.to(dtype))]
    n = delta.numel()
    base = torch.zeros(n, dtype=dtype)
    weight = torch.full((n,), 7.0, dtype=dtype)
    zeros = [torch.zeros(n) for _ in range(2)]
    gk.sparse_adamw_step_(
        weight, torch.zeros_like(weight), torch.arange(n), base, delta.clone(), *zeros, step=1, lr=0.0,
        nonfinite=nonfinite,
    )  # fmt: skip
    _assert_same_cast(weight, (base.float() + delta).to(dtype))


def test_a_gpu_nan_stays_nan_in_bf16(backend):
    """The reported case: 0x7FFFFFFF scattered into bf16 was written as -0.0 by the Triton path."""
    w = torch.ones(4, dtype=torch.bfloat16)
    nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    gk.scatter_(w, torch.tensor([2]), nan, nonfinite="assume_finite")
    assert torch.isnan(w[2]) and w[[0, 1, 3]].eq(1).all()
