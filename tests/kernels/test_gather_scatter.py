"""gather and scatter_ against torch indexing, on both backends: every float dtype, rounding, bad input."""

import pytest
import torch

import gallop_kernels as gk

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
