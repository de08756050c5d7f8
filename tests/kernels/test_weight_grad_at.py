"""weight_grad_at: the weight gradient of a linear layer at selected entries, against torch's own linear backward."""

import importlib
import zlib

import pytest
import torch

import gallop_kernels as gk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _assert_close(got, want, dy, x, idx, dtype):
    """Entry i is a sum of T products: summation order and the dense path's rounding to ``dtype`` move it by a few
    ``eps(dtype)`` of the sum of the products' magnitudes."""
    magnitude = (dy.abs().float().t() @ x.abs().float()).reshape(-1)[idx.long()]
    bound = 4 * torch.finfo(dtype).eps * magnitude + 1e-30
    assert bool(((got.cpu() - want).abs() <= bound).all()), float(((got.cpu() - want).abs() / bound).max())


def _stock(dy, x):
    """The dense weight gradient torch's linear backward computes, through autograd."""
    w = torch.zeros(dy.shape[-1], x.shape[-1], dtype=x.dtype, requires_grad=True)
    torch.nn.functional.linear(x, w).backward(dy)
    return w.grad


@pytest.mark.parametrize("path", ["dense", "sampled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens, m, n", [(1, 1, 1), (7, 5, 3), (2 * 9, 33, 17), (0, 4, 6)])
def test_matches_stock_linear_backward(backend, device, dtype, tokens, m, n, path):
    gen = torch.Generator().manual_seed(_seed(tokens, m, n, str(dtype)))
    dy = torch.randn(tokens, m, generator=gen).to(dtype)
    x = torch.randn(tokens, n, generator=gen).to(dtype)
    idx = torch.sort(torch.randperm(m * n, generator=gen)[: max(1, m * n // 3)]).values
    want = _stock(dy, x).reshape(-1)[idx].float()
    for idx_dtype in (torch.int32, torch.int64):
        got = gk.weight_grad_at(dy.to(device), x.to(device), idx.to(idx_dtype).to(device), path=path)
        assert got.dtype == torch.float32 and got.shape == idx.shape
        _assert_close(got, want, dy, x, idx, dtype)


@pytest.mark.parametrize("path", ["dense", "sampled"])
def test_leading_dimensions_and_transposed_layout(backend, device, path):
    """[batch, seq, features] inputs; a Conv1D weight [in, out] is (input, grad_output) swapped."""
    gen = torch.Generator().manual_seed(_seed("3d"))
    dy = torch.randn(2, 5, 4, generator=gen)
    x = torch.randn(2, 5, 3, generator=gen)
    idx = torch.tensor([0, 5, 11])
    dense = dy.reshape(-1, 4).t() @ x.reshape(-1, 3)
    torch.testing.assert_close(gk.weight_grad_at(dy, x, idx, path=path), dense.reshape(-1)[idx])
    torch.testing.assert_close(gk.weight_grad_at(x, dy, idx, path=path), dense.t().reshape(-1)[idx])


@pytest.mark.parametrize("order", ["sorted", "shuffled", "duplicates"])
def test_sampled_path_takes_indices_in_any_order(backend, device, order):
    """The sampled path builds a CSR pattern, which needs sorted unique indices: any other order gives the same
    entries, in the order asked for."""
    gen = torch.Generator().manual_seed(_seed("order", order))
    dy, x = torch.randn(9, 13, generator=gen), torch.randn(9, 11, generator=gen)
    idx = torch.randperm(13 * 11, generator=gen)[:40]
    if order == "sorted":
        idx = idx.sort().values
    elif order == "duplicates":
        idx = torch.cat([idx, idx[:7], idx[3:5]])
    want = (dy.t() @ x).reshape(-1)[idx]
    got = gk.weight_grad_at(dy.to(device), x.to(device), idx.to(device), path="sampled")
    _assert_close(got, want, dy, x, idx, torch.float32)


def test_zeros_ties_and_huge_tiny_values(backend, device):
    dy = torch.tensor([[0.0, 1e30, -1e-30], [0.0, 1e30, 1e-30]])
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = gk.weight_grad_at(dy, x, torch.arange(6))
    assert torch.equal(got, torch.tensor([0.0, 0.0, 2e30, 0.0, 0.0, 0.0]))
    assert gk.weight_grad_at(dy, x, torch.empty(0, dtype=torch.int64)).numel() == 0


def test_auto_picks_the_sampled_path_for_sparse_tensors(monkeypatch):
    # the folder, not the op: gallop_kernels.weight_grad_at is the public function
    weight_grad_at_folder = importlib.import_module("gallop_kernels.weight_grad_at")

    cpu = torch.device("cpu")
    assert weight_grad_at_folder.choose_path("auto", 10, 100, 100, cpu) == "sampled"  # 0.1%
    assert weight_grad_at_folder.choose_path("auto", 100, 100, 100, cpu) == "sampled"  # 1%
    assert weight_grad_at_folder.choose_path("auto", 5000, 100, 100, cpu) == "dense"  # 50%
    assert (
        weight_grad_at_folder.choose_path("auto", 10, 100, 100, torch.device("cuda")) == "dense"
    )  # not measured there yet
    assert weight_grad_at_folder.choose_path("dense", 1, 100, 100, cpu) == "dense"
    calls = []
    monkeypatch.setattr(
        weight_grad_at_folder, "weight_grad_at", lambda g, x, i, path: calls.append(path) or torch.zeros(1)
    )
    gk.weight_grad_at(torch.ones(4, 100), torch.ones(4, 100), torch.tensor([3]))
    assert calls == ["sampled"]


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
    with pytest.raises(ValueError, match="path must be one of"):
        gk.weight_grad_at(dy, x, idx, path="fast")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_both_paths_round_to_the_inputs_dtype_alike(backend, dtype):
    """Issue 20: an fp16 entry beyond 65504 was inf on the dense path and 9e6 on the sampled one, so ``auto``
    answered differently by density. Both now round once to the inputs' dtype, as torch's linear backward does."""
    dy = torch.full((3000, 2), 60.0, dtype=dtype)
    x = torch.full((3000, 3), 50.0, dtype=dtype)
    x[:, 2] = 2.0**-8  # every partial sum exact in fp32: the paths may sum in any order
    idx = torch.arange(6)
    dense = gk.weight_grad_at(dy, x, idx, path="dense")
    sampled = gk.weight_grad_at(dy, x, idx, path="sampled")
    want = (dy.t() @ x).reshape(-1).float()  # torch: 9e6 is inf in fp16, 8998912 in bf16
    assert torch.equal(dense, want) and torch.equal(sampled, want)
    assert torch.isinf(want[0]) == (dtype == torch.float16)
