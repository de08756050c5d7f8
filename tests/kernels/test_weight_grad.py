"""weight_grad_at: the weight gradient of a linear layer at selected entries, against torch's own linear backward."""

import zlib

import pytest
import torch

import gallop_kernels as gk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _tol(dtype):
    """The dense path rounds each entry once to ``dtype``; a sampled kernel would not: two roundings apart."""
    eps = torch.finfo(dtype).eps
    return dict(rtol=2 * eps, atol=2 * eps)


def _stock(dy, x):
    """The dense weight gradient torch's linear backward computes, through autograd."""
    w = torch.zeros(dy.shape[-1], x.shape[-1], dtype=x.dtype, requires_grad=True)
    torch.nn.functional.linear(x, w).backward(dy)
    return w.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, m, n", [(1, 1, 1), (7, 5, 3), (2 * 9, 33, 17), (0, 4, 6)])
def test_matches_stock_linear_backward(backend, device, dtype, tokens, m, n):
    gen = torch.Generator().manual_seed(_seed(tokens, m, n, str(dtype)))
    dy = torch.randn(tokens, m, generator=gen).to(dtype)
    x = torch.randn(tokens, n, generator=gen).to(dtype)
    idx = torch.sort(torch.randperm(m * n, generator=gen)[: max(1, m * n // 3)]).values
    want = _stock(dy, x).reshape(-1)[idx].float()
    for idx_dtype in (torch.int32, torch.int64):
        got = gk.weight_grad_at(dy.to(device), x.to(device), idx.to(idx_dtype).to(device))
        assert got.dtype == torch.float32 and got.shape == idx.shape
        torch.testing.assert_close(got.cpu(), want, **_tol(dtype))


def test_leading_dimensions_and_transposed_layout(backend, device):
    """[batch, seq, features] inputs; a Conv1D weight [in, out] is (input, grad_output) swapped."""
    gen = torch.Generator().manual_seed(_seed("3d"))
    dy = torch.randn(2, 5, 4, generator=gen)
    x = torch.randn(2, 5, 3, generator=gen)
    idx = torch.tensor([0, 5, 11])
    dense = dy.reshape(-1, 4).t() @ x.reshape(-1, 3)
    torch.testing.assert_close(gk.weight_grad_at(dy, x, idx), dense.reshape(-1)[idx])
    torch.testing.assert_close(gk.weight_grad_at(x, dy, idx), dense.t().reshape(-1)[idx])


def test_zeros_ties_and_huge_tiny_values(backend, device):
    dy = torch.tensor([[0.0, 1e30, -1e-30], [0.0, 1e30, 1e-30]])
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = gk.weight_grad_at(dy, x, torch.arange(6))
    assert torch.equal(got, torch.tensor([0.0, 0.0, 2e30, 0.0, 0.0, 0.0]))
    assert gk.weight_grad_at(dy, x, torch.empty(0, dtype=torch.int64)).numel() == 0


def test_bad_arguments():
    dy, x, idx = torch.randn(3, 4), torch.randn(3, 5), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="grad_output is torch.float32 but input is torch.bfloat16"):
        gk.weight_grad_at(dy, x.bfloat16(), idx)
    with pytest.raises(ValueError, match="leading"):
        gk.weight_grad_at(dy, torch.randn(2, 5), idx)
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        gk.weight_grad_at(dy, x, idx.float())
    with pytest.raises(TypeError, match="floating dtype"):
        gk.weight_grad_at(dy.long(), x, idx)
