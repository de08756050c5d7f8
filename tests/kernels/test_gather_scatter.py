"""gather, scatter_ and scatter_grouped_ against torch indexing, on both backends: every float dtype, rounding, NaN
payloads, odd sizes, mixed dtypes in one group, bad input."""

import pytest
import torch

import gallop_kernels as gk
from gallop_kernels import _registry

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (17,), (33, 65)])
def test_gather_matches_indexing(backend, device, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(shape, generator=gen).to(dtype).to(device)
    n = src.numel()
    idx = torch.sort(torch.randperm(n, generator=gen)[: max(1, n // 3)]).values.to(device)
    for idx_dtype in (torch.int32, torch.int64):
        i = idx.to(idx_dtype)
        assert torch.equal(gk.gather(src, i), src.reshape(-1)[idx].float())
        out = torch.ones(i.numel(), device=device)
        gk.gather(src, i, out=out, accumulate=True)
        assert torch.equal(out, 1.0 + src.reshape(-1)[idx].float())


def test_gather_empty(backend, device):
    out = gk.gather(torch.randn(5, device=device), torch.empty(0, dtype=torch.int64, device=device))
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_base", [False, True])
def test_scatter_matches_indexing(backend, device, dtype, with_base):
    gen = torch.Generator().manual_seed(1)
    dst = torch.randn(29, 31, generator=gen).to(dtype).to(device)
    idx = torch.sort(torch.randperm(dst.numel(), generator=gen)[:300]).values.to(device)
    values = (torch.randn(300, generator=gen) * 1e-3).to(device)
    base = dst.reshape(-1)[idx].clone() if with_base else None
    want = dst.clone()
    want.view(-1)[idx] = ((base.float() + values) if with_base else values).to(dtype)
    untouched = torch.ones(dst.numel(), dtype=torch.bool, device=device)
    untouched[idx] = False
    before = dst.clone()
    gk.scatter_(dst, idx.to(torch.int32), values, base=base)
    assert torch.equal(dst, want)
    assert torch.equal(dst.view(-1)[untouched], before.view(-1)[untouched])  # bit-identical elsewhere


def test_scatter_rounds_once_from_fp32(backend, device):
    """base + delta is summed in fp32 and rounded once: a 1e-3 delta on a bf16 weight of 1.0 rounds to 1.0."""
    dst = torch.zeros(4, dtype=torch.bfloat16, device=device)
    base = torch.ones(4, dtype=torch.bfloat16, device=device)
    idx = torch.arange(4, device=device)
    delta = torch.tensor([1e-3, 4e-3, 5e-3, -2e-3], device=device)
    gk.scatter_(dst, idx, delta, base=base)
    assert dst.tolist() == (base.float() + delta).to(torch.bfloat16).tolist()


def test_scatter_non_contiguous_dst_rejected():
    dst = torch.zeros(4, 6).t()
    with pytest.raises(ValueError, match="dst must be contiguous"):
        gk.scatter_(dst, torch.tensor([0, 1]), torch.zeros(2))


def test_scatter_bad_args():
    dst = torch.zeros(10)
    with pytest.raises(ValueError, match="values has length 3 but indices has length 2"):
        gk.scatter_(dst, torch.tensor([0, 1]), torch.zeros(3))
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        gk.scatter_(dst, torch.tensor([0.0, 1.0]), torch.zeros(2))
    with pytest.raises(ValueError, match="base must be 1-D with length 2"):
        gk.scatter_(dst, torch.tensor([0, 1]), torch.zeros(2), base=torch.zeros(3))
    with pytest.raises(TypeError, match="dst must have a floating dtype"):
        gk.scatter_(torch.zeros(10, dtype=torch.int64), torch.tensor([0, 1]), torch.zeros(2))


def test_gather_bad_args():
    with pytest.raises(ValueError, match="out has length 3 but indices has length 2"):
        gk.gather(torch.zeros(10), torch.tensor([0, 1]), out=torch.zeros(3))
    with pytest.raises(ValueError, match="accumulate=True needs an out"):
        gk.gather(torch.zeros(10), torch.tensor([0, 1]), accumulate=True)
    with pytest.raises(ValueError, match="indices must be 1-D"):
        gk.gather(torch.zeros(10), torch.tensor([[0, 1]]))


# ------------------------------------------------------------------------------------------------ scatter_grouped_
# NaN payloads of either sign (0x7FFFFFFF first: what GPUs produce), +-inf, fp32 max, past fp16 max, the smallest
# fp32 denormal, a bf16 tie to even, -0
SPECIAL_BITS = [
    0x7FFFFFFF,
    0xFFC00001,
    0x7F800000,
    0xFF800000,
    0x7F7FFFFF,
    0x477FF000,
    0x00000001,
    0x3F808000,
    0x80000000,
]


def _group(device, sizes, dtypes, idx_dtypes, *, base_dtypes=None, seed=2, special=False):
    """Dense tensors, unique sorted indices (a third of each, at least one where possible), fp32 values, bases."""
    gen = torch.Generator().manual_seed(seed)
    dsts, indices, values, bases = [], [], [], []
    for i, n in enumerate(sizes):
        dtype = dtypes[i % len(dtypes)]
        dsts.append(torch.randn(n, generator=gen).to(dtype).to(device))
        k = max(1, n // 3) if n else 0
        idx = torch.sort(torch.randperm(n, generator=gen)[:k]).values
        indices.append(idx.to(idx_dtypes[i % len(idx_dtypes)]).to(device))
        vals = torch.randn(k, generator=gen) * 1e-2
        if special:
            bits = torch.tensor(SPECIAL_BITS, dtype=torch.int64).to(torch.int32).view(torch.float32)
            vals[: min(k, bits.numel())] = bits[:k]
        values.append(vals.to(device))
        if base_dtypes is not None:
            bases.append(dsts[-1].reshape(-1)[idx].to(base_dtypes[i % len(base_dtypes)]).to(device))
    return dsts, indices, values, (bases if base_dtypes is not None else None)


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-identical, except that a NaN only has to stay a NaN (its payload is implementation-defined)."""
    nan = torch.isnan(want)
    if not torch.equal(torch.isnan(got), nan):
        return False
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    return torch.equal(got[~nan].view(ints), want[~nan].view(ints))


def _oracle(dsts, indices, values, bases):
    """Plain torch indexing, one tensor at a time: ``w.view(-1)[idx] = (fp32(base) + v).to(w.dtype)``."""
    out = [d.clone() for d in dsts]
    for i, (w, idx, v) in enumerate(zip(out, indices, values)):
        vals = v if bases is None else bases[i].float() + v
        w.view(-1)[idx.long()] = vals.to(w.dtype)
    return out


# sizes around the kernel's block (1024 indices: 3 * 1024 elements) and odd, empty and one-element tensors
GROUP_SIZES = [0, 1, 7, 3 * 1023, 3 * 1024 + 5, 100, 0, 2]


@pytest.mark.parametrize("with_base", [False, True])
def test_scatter_grouped_matches_indexing_across_mixed_dtypes(backend, device, with_base):
    """fp32, bf16 and fp16 weights, int32 and int64 indices and bf16/fp32 bases in one call: every entry bit for bit
    as torch indexing writes it, and every other element untouched."""
    base_dtypes = [torch.bfloat16, torch.float32] if with_base else None
    dsts, indices, values, bases = _group(
        device, GROUP_SIZES, DTYPES, [torch.int32, torch.int32, torch.int64], base_dtypes=base_dtypes
    )
    want = _oracle(dsts, indices, values, bases)
    gk.scatter_grouped_(dsts, indices, values, bases=bases)
    for i, (got, w) in enumerate(zip(dsts, want)):
        assert _same_bits(got, w), f"entry {i} ({got.dtype}, {got.numel()} elements)"


@pytest.mark.parametrize("with_base", [False, True])
def test_scatter_grouped_is_scatter_per_entry_on_special_values(backend, device, with_base):
    """NaN payloads (0x7FFFFFFF, as GPUs produce), +-inf, overflow, denormals and ties: each entry as the single
    scatter_ writes it on the same backend, and every NaN a NaN."""
    base_dtypes = [torch.float32] if with_base else None
    sizes = [40, 33, 27, 3 * 1024 + 1]
    dsts, indices, values, bases = _group(
        device, sizes, DTYPES, [torch.int64, torch.int32], base_dtypes=base_dtypes, special=True
    )
    singles = [d.clone() for d in dsts]
    for i, (w, idx, v) in enumerate(zip(singles, indices, values)):
        gk.scatter_(w, idx, v, base=None if bases is None else bases[i], nonfinite="assume_finite")
    want = _oracle(dsts, indices, values, bases)
    gk.scatter_grouped_(dsts, indices, values, bases=bases, nonfinite="assume_finite")
    for i, (got, single, w) in enumerate(zip(dsts, singles, want)):
        assert torch.equal(got.view(torch.uint8), single.view(torch.uint8)), f"entry {i} differs from scatter_"
        assert _same_bits(got, w), f"entry {i} differs from torch's cast"
        assert torch.isnan(got.view(-1)[indices[i][0].long()]), "0x7FFFFFFF was not written as a NaN"


def test_scatter_grouped_triton_matches_reference_bit_for_bit(device, monkeypatch):
    """The two backends write the same bits (NaN payloads included) on a group with every dtype and odd sizes."""
    args = _group(device, GROUP_SIZES, DTYPES, [torch.int64, torch.int32], base_dtypes=DTYPES, special=True)
    out = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("GALLOP_BACKEND", backend)
        dsts = [d.clone() for d in args[0]]
        gk.scatter_grouped_(dsts, *args[1:3], bases=args[3], nonfinite="assume_finite")
        out[backend] = dsts
    for i, (a, b) in enumerate(zip(out["reference"], out["triton"])):
        assert _same_bits(b, a), f"entry {i}"


def test_scatter_grouped_huge_and_tiny(backend, device):
    """Values near the dtypes' maxima (finite after rounding) and fp32/fp16 denormals, through the checked path."""
    dsts = [torch.zeros(8, dtype=dt, device=device) for dt in DTYPES]
    idx = [torch.arange(4, device=device) for _ in dsts]
    big = {torch.float32: 3.4e38, torch.bfloat16: 3.38e38, torch.float16: 65504.0}
    values = [torch.tensor([big[d.dtype], -big[d.dtype], 2.0**-149, 2.0**-24], device=device) for d in dsts]
    want = _oracle(dsts, idx, values, None)
    gk.scatter_grouped_(dsts, idx, values)  # nonfinite="skip": all finite, so everything is written
    assert all(torch.equal(a, b) for a, b in zip(dsts, want))


def test_scatter_grouped_empty_group_and_empty_tensors(backend, device):
    gk.scatter_grouped_([], [], [])
    gk.scatter_grouped_([], [], [], bases=[])
    dsts = [torch.ones(3, device=device), torch.ones(0, device=device)]
    empty = [torch.empty(0, dtype=torch.int64, device=device) for _ in dsts]
    gk.scatter_grouped_(dsts, empty, [torch.empty(0, device=device) for _ in dsts])
    assert dsts[0].eq(1).all() and dsts[1].numel() == 0


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_scatter_grouped_nonfinite_writes_nothing(backend, device, nonfinite):
    """One fp16 overflow in the last entry: no tensor of the group is written (skip warns, raise raises), and the
    message names the entry."""
    dsts = [torch.zeros(4, device=device), torch.zeros(4, dtype=torch.float16, device=device)]
    idx = [torch.arange(2, device=device)] * 2
    values = [torch.ones(2, device=device), torch.tensor([1.0, 7e4], device=device)]
    if nonfinite == "skip":
        with pytest.warns(RuntimeWarning, match=r"cast\(values\[1\]\) to torch.float16 holds NaN or Inf"):
            gk.scatter_grouped_(dsts, idx, values)
    else:
        with pytest.raises(FloatingPointError, match=r"values\[1\]"):
            gk.scatter_grouped_(dsts, idx, values, nonfinite="raise")
    assert all(d.eq(0).all() for d in dsts)


def test_scatter_grouped_duplicates_and_range_checked_for_the_group():
    dsts = [torch.zeros(10), torch.zeros(5)]
    values = [torch.ones(2), torch.ones(2)]
    with pytest.raises(ValueError, match=r"indices\[1\] holds duplicates"):
        gk.scatter_grouped_(dsts, [torch.tensor([0, 1]), torch.tensor([3, 3])], values)
    with pytest.raises(ValueError, match=r"indices\[1\] must lie in \[0, 5\)"):
        gk.scatter_grouped_(dsts, [torch.tensor([0, 9]), torch.tensor([1, 5])], values)
    gk.scatter_grouped_(dsts, [torch.tensor([9, 0]), torch.tensor([4, 1])], values)  # unsorted but unique is fine
    assert dsts[0][[0, 9]].eq(1).all() and dsts[1][[1, 4]].eq(1).all() and dsts[0].sum() == 2


def test_scatter_grouped_bad_args_leave_everything_untouched():
    dsts = [torch.zeros(10), torch.zeros(6)]
    idx = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    values = [torch.ones(2), torch.ones(2)]
    cases = [
        (TypeError, r"dsts must be a list or tuple of tensors", (torch.zeros(3), idx, values), {}),
        (ValueError, r"dsts, indices, values must have one entry per tensor, got lengths dsts 2, indices 1",
         (dsts, idx[:1], values), {}),
        (ValueError, r"got lengths dsts 2, indices 2, values 2, bases 1", (dsts, idx, values),
         {"bases": [torch.ones(2)]}),
        (ValueError, r"values\[1\] has length 3 but indices\[1\] has length 2",
         (dsts, idx, [values[0], torch.ones(3)]), {}),
        (TypeError, r"indices\[0\] must be int32 or int64", (dsts, [idx[0].float(), idx[1]], values), {}),
        (TypeError, r"values\[1\] must be float32", (dsts, idx, [values[0], values[1].half()]), {}),
        (ValueError, r"bases\[1\] must be 1-D with length 2", (dsts, idx, values),
         {"bases": [torch.ones(2), torch.ones(3)]}),
        (ValueError, r"dsts\[1\] must be contiguous", ([dsts[0], torch.zeros(4, 6).t()], idx, values), {}),
        (TypeError, r"dsts\[0\] must have a floating dtype", ([torch.zeros(10, dtype=torch.int64), dsts[1]], idx,
         values), {}),
        (ValueError, r"dsts\[0\] and dsts\[1\] share memory", ([dsts[0], dsts[0][4:]], idx, values), {}),
        (ValueError, r"dsts\[1\] and values\[0\] share memory", ([dsts[0], dsts[1]], idx, [dsts[1][:2], values[1]]),
         {}),
        (ValueError, r"nonfinite must be one of", (dsts, idx, values), {"nonfinite": "ignore"}),
    ]  # fmt: skip
    for error, match, args, kwargs in cases:
        with pytest.raises(error, match=match):
            gk.scatter_grouped_(*args, **kwargs)
        assert dsts[0].eq(0).all() and dsts[1].eq(0).all(), match
    shared = torch.ones(4)  # the read-only arguments of different entries may share memory
    gk.scatter_grouped_(dsts, [torch.tensor([0, 1]), torch.tensor([0, 1])], [shared[:2], shared[:2]])
    assert dsts[0][:2].eq(1).all() and dsts[1][:2].eq(1).all()


def test_scatter_grouped_refuses_a_weight_that_requires_grad():
    w = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match=r"dsts\[0\] requires grad"):
        gk.scatter_grouped_([w], [torch.tensor([0])], [torch.ones(1)])
    with torch.no_grad():
        gk.scatter_grouped_([w], [torch.tensor([0])], [torch.ones(1)])
    assert w[0] == 1


def test_scatter_grouped_moves_version_counters(backend, device):
    dsts = [torch.zeros(4, device=device), torch.zeros(4, dtype=torch.bfloat16, device=device)]
    before = [d._version for d in dsts]
    gk.scatter_grouped_(dsts, [torch.tensor([1], device=device)] * 2, [torch.ones(1, device=device)] * 2)
    assert all(d._version > v for d, v in zip(dsts, before))


def test_scatter_grouped_launches_once_per_dtype_triple(monkeypatch):
    """The Triton launcher: one launch for a group of one dtype, however many tensors; one more per other dtype."""
    if not _registry.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (the kernel runs on CPU tensors)")
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    from gallop_kernels.gather_scatter import triton as tscatter

    grids = []
    kernel = tscatter._scatter_grouped_kernel

    class Counted:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tscatter, "_scatter_grouped_kernel", Counted())
    for dtypes, launches in (([torch.bfloat16], 1), ([torch.bfloat16, torch.float16, torch.float32], 3)):
        grids.clear()
        dsts, indices, values, bases = _group("cpu", [30] * 12, dtypes, [torch.int32], base_dtypes=[torch.float32])
        gk.scatter_grouped_(dsts, indices, values, bases=bases)
        assert len(grids) == launches
        assert all(_same_bits(a, b) for a, b in zip(dsts, _oracle(*_group("cpu", [30] * 12, dtypes, [torch.int32],
                                                                            base_dtypes=[torch.float32]))))  # fmt: skip
