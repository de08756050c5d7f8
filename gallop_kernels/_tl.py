"""Small Triton helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even on every target.

    bf16 is rounded explicitly on the bits (``(b + 0x7FFF + lsb) >> 16``, finite inputs) because Triton's
    interpreter truncates where the GPU's ``cvt.rn.bf16.f32`` rounds; the two must write identical weights.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
