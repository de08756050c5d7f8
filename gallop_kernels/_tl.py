"""Small Triton helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` exactly as torch's ``Tensor.to(dtype)`` converts, on every target.

    bf16 is rounded explicitly on the bits (``(b + 0x7FFF + lsb) >> 16``) because Triton's interpreter truncates
    where the GPU's ``cvt.rn.bf16.f32`` rounds; the two must write identical weights. The bit trick is exact
    round-to-nearest-even for every finite input, denormals included, and carries an overflow into +-inf, as torch
    does; a NaN (any payload, any sign; GPUs produce ``0x7FFFFFFF``, which the trick alone would carry to ``-0.0``,
    and a signalling NaN to inf) becomes the quiet NaN ``0x7FC0``. (A NaN's bits are implementation-defined: torch
    writes bf16 ``0xFFFF`` on the CPU, ``0x7FFF`` on CUDA.) Other dtypes use the hardware conversion: round to
    nearest even, and every NaN stays a NaN.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
