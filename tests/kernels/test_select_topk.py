"""select_topk against the brute-force oracle, on both backends: odd shapes, ties, adversarial values, dtypes."""

import zlib

import pytest
import torch

import gallop_kernels as gk
from gallop_kernels import _common
from gallop_kernels.select_topk import reference
from gallop_kernels.select_topk import triton as tselect

from .oracle import brute_force_topk

SCORERS = ["gallop", "gradient", "magnitude", "product", "random"]
SHAPES = [(3, 5), (7,), (1,), (13, 11), (0,), (4, 1, 3), (33,)]


def _data(kind, shapes, dtype, gen):
    if kind == "normal":
        ws = [torch.randn(s, generator=gen) for s in shapes]
        gs = [torch.randn(s, generator=gen) for s in shapes]
    elif kind == "quantized":  # heavy ties
        ws = [torch.randint(-2, 3, s, generator=gen).float() for s in shapes]
        gs = [torch.randint(-2, 3, s, generator=gen).float() for s in shapes]
    elif kind == "constant":  # every score equal
        ws = [torch.full(s, 0.5) for s in shapes]
        gs = [torch.full(s, -0.25) for s in shapes]
    elif kind == "zeros_and_extremes":
        # magnitudes from 1e-15 to 1e15 (gradients 1e-10 to 1e10): every scorer stays finite in fp32
        ws = [torch.randn(s, generator=gen) * 10 ** torch.randint(-15, 16, s, generator=gen).float() for s in shapes]
        gs = [torch.randn(s, generator=gen) * 10 ** torch.randint(-10, 11, s, generator=gen).float() for s in shapes]
        for w, g in zip(ws, gs):
            w.view(-1)[::3] = 0.0
            g.view(-1)[::4] = 0.0
    else:
        raise AssertionError(kind)
    if dtype == torch.float16:  # stay inside fp16's range (max 65504) instead of casting to inf
        gs, ws = [g.clamp(-6e4, 6e4) for g in gs], [w.clamp(-6e4, 6e4) for w in ws]
    return [g.to(dtype) for g in gs], [w.to(dtype) for w in ws]


def _check(grads, weights, k, scorer, **kw):
    got = gk.select_topk(None if scorer in ("magnitude", "random") else grads, weights, k, scorer=scorer, **kw)
    want = brute_force_topk(grads, weights, k, scorer, **kw)
    assert len(got) == len(weights)
    assert sum(int(g.numel()) for g in got) == k
    for t, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.int32, g.dtype
        assert torch.equal(g.cpu().long(), w), f"tensor {t}: {g.tolist()} != {w.tolist()}"


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("kind", ["normal", "quantized", "constant", "zeros_and_extremes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_oracle(backend, device, scorer, kind, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{scorer}/{kind}/{dtype}".encode()))
    grads, weights = _data(kind, SHAPES, dtype, gen)
    grads, weights = [g.to(device) for g in grads], [w.to(device) for w in weights]
    total = sum(w.numel() for w in weights)
    for k in (1, 2, 17, total // 2, total - 1, total):
        _check(grads, weights, k, scorer)


def test_mixed_dtypes(backend, device):
    gen = torch.Generator().manual_seed(1)
    weights = [
        torch.randn(9, 7, generator=gen).to(dt).to(device) for dt in (torch.bfloat16, torch.float16, torch.float32)
    ]
    grads = [
        torch.randn(9, 7, generator=gen).to(dt).to(device) for dt in (torch.float32, torch.bfloat16, torch.float16)
    ]
    for k in (1, 50, 189):
        _check(grads, weights, k, "gallop")


def test_ties_go_to_lower_tensor_then_lower_index(backend, device):
    weights = [torch.ones(5, device=device), torch.ones(4, device=device)]
    grads = [torch.ones(5, device=device), torch.ones(4, device=device)]
    got = gk.select_topk(grads, weights, 7)
    assert got[0].tolist() == [0, 1, 2, 3, 4] and got[1].tolist() == [0, 1]


def test_eps_changes_ranking_of_zero_weights(backend, device):
    w = torch.tensor([0.0, 1.0], device=device)
    g = torch.tensor([1e-6, 1.0], device=device)
    assert gk.select_topk([g], [w], 1, eps=1e-8)[0].tolist() == [0]  # 1e-6 / 1e-8 = 100 > 1
    assert gk.select_topk([g], [w], 1, eps=1.0)[0].tolist() == [1]  # 1e-6 / 1 < 1 / 2


def test_random_scorer_is_seeded_and_uniform(backend, device):
    w = [torch.zeros(4000, device=device), torch.zeros(4000, device=device)]
    a = gk.select_topk(None, w, 800, scorer="random", seed=3)
    b = gk.select_topk(None, w, 800, scorer="random", seed=3)
    c = gk.select_topk(None, w, 800, scorer="random", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert 300 < a[0].numel() < 500  # about half from each tensor
    assert not torch.equal(a[0], a[1])  # tensor position is part of the hash


def test_candidate_overflow_path(monkeypatch, device):
    """Heavy ties beyond the candidate buffer take the three-pass route and give the same answer."""
    monkeypatch.setattr(reference, "CANDIDATE_CAP", 4)
    gen = torch.Generator().manual_seed(0)
    grads, weights = _data("quantized", SHAPES, torch.float32, gen)
    for k in (1, 30, 200):
        _check(grads, weights, k, "gallop")


def test_chunking_path(monkeypatch):
    """Tensors spanning many chunks (the reference scores CHUNK elements at a time)."""
    monkeypatch.setattr(reference, "CHUNK", 7)
    gen = torch.Generator().manual_seed(0)
    for kind in ("normal", "quantized"):
        grads, weights = _data(kind, SHAPES, torch.float32, gen)
        for scorer in SCORERS:
            _check(grads, weights, 40, scorer)


def test_int64_index_path(monkeypatch):
    """Tensors at or beyond the int32 limit get int64 indices (limit lowered to test without 2**31 elements)."""
    monkeypatch.setattr(_common, "INT32_LIMIT", 50)
    monkeypatch.setattr(reference, "CHUNK", 16)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(49, generator=gen), torch.randn(50, generator=gen), torch.randn(77, generator=gen)]
    grads = [torch.randn(w.shape, generator=gen) for w in weights]
    got = gk.select_topk(grads, weights, 60)
    assert [g.dtype for g in got] == [torch.int32, torch.int64, torch.int64]
    want = brute_force_topk(grads, weights, 60)
    assert all(torch.equal(g.long(), w) for g, w in zip(got, want))


def test_random_hash_high_index_bits():
    """The hash mixes the upper 32 bits of int64 flat indices (positions beyond 2**32 differ)."""
    idx = torch.tensor([5, 5 + 2**32, 5 + 2**33], dtype=torch.int64)
    keys = reference.random_keys(0, 0, idx)
    assert len(set(keys.tolist())) == 3
    assert keys.dtype == torch.int32 and int(keys.min()) >= 0


def test_random_hash_matches_scalar_definition():
    """The vectorized hash equals the documented scalar definition (what every backend must reproduce)."""

    def mix(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    seed, pos = 12345, 7
    idx = [0, 1, 2**31 + 3, 2**32 + 9, 2**40 + 1]
    t = mix(mix(seed) ^ pos)
    want = [mix(mix((i >> 32) ^ t) ^ (i & 0xFFFFFFFF)) >> 2 for i in idx]
    got = reference.random_keys(seed, pos, torch.tensor(idx, dtype=torch.int64)).tolist()
    assert got == want


def test_inputs_not_modified(backend, device):
    gen = torch.Generator().manual_seed(0)
    grads, weights = _data("normal", SHAPES, torch.float32, gen)
    grads, weights = [g.to(device) for g in grads], [w.to(device) for w in weights]
    before = [t.clone() for t in grads + weights]
    gk.select_topk(grads, weights, 20)
    gk.select_topk(grads, weights, 20, scorer="product")
    assert all(torch.equal(a, b) for a, b in zip(before, grads + weights))


def test_non_contiguous_inputs(backend, device):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 6, generator=gen).to(device).t()
    g = torch.randn(8, 6, generator=gen).to(device).t()
    _check([g], [w], 10, "gallop")


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("k", [0, -1, 10])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"k must be in \[1, 9\]"):
        gk.select_topk([torch.ones(9)], [torch.ones(9)], k)


def test_k_not_int():
    with pytest.raises(TypeError, match="k must be an int"):
        gk.select_topk([torch.ones(9)], [torch.ones(9)], 2.0)


def test_shape_mismatch_names_position():
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(4,\) but weights\[1\] has shape \(5,\)"):
        gk.select_topk([torch.ones(3), torch.ones(4)], [torch.ones(3), torch.ones(5)], 2)


def test_length_mismatch():
    with pytest.raises(ValueError, match="grads has 1 tensors but weights has 2"):
        gk.select_topk([torch.ones(3)], [torch.ones(3), torch.ones(5)], 2)


def test_integer_dtype_rejected():
    with pytest.raises(TypeError, match=r"weights\[0\] must have a floating dtype"):
        gk.select_topk([torch.ones(3)], [torch.ones(3, dtype=torch.int32)], 2)
    with pytest.raises(TypeError, match=r"grads\[0\] must have a floating dtype"):
        gk.select_topk([torch.ones(3, dtype=torch.int64)], [torch.ones(3)], 2)


def test_unknown_scorer():
    with pytest.raises(ValueError, match="scorer must be one of"):
        gk.select_topk([torch.ones(3)], [torch.ones(3)], 2, scorer="abs")


def test_grads_required():
    with pytest.raises(ValueError, match="needs gradients"):
        gk.select_topk(None, [torch.ones(3)], 2, scorer="gallop")
    with pytest.raises(ValueError, match=r"grads\[0\] is None"):
        gk.select_topk([None], [torch.ones(3)], 2, scorer="product")


def test_single_tensor_instead_of_list():
    with pytest.raises(TypeError, match="sequence of tensors"):
        gk.select_topk(torch.ones(3), torch.ones(3), 2)


def test_bad_eps():
    with pytest.raises(ValueError, match="eps must be"):
        gk.select_topk([torch.ones(3)], [torch.ones(3)], 2, eps=-1.0)


def test_device_mismatch():
    meta = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match="move all tensors to one device"):
        gk.select_topk([torch.ones(3)], [meta], 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_scores_name_tensor(backend, device, bad):
    g = [torch.ones(4, device=device), torch.tensor([1.0, bad, 0.5], device=device)]
    w = [torch.ones(4, device=device), torch.ones(3, device=device)]
    with pytest.raises(ValueError, match="scores of tensor 1 contain NaN or Inf"):
        gk.select_topk(g, w, 2)
    with pytest.raises(ValueError, match="scores of tensor 1 contain NaN or Inf"):
        gk.select_topk(None, [w[0], g[1]], 2, scorer="magnitude")


def test_overflowing_score_is_reported(backend, device):
    g = [torch.tensor([3e38, 1.0], device=device)]
    w = [torch.tensor([0.0, 1.0], device=device)]
    with pytest.raises(ValueError, match="raise eps"):
        gk.select_topk(g, w, 1)


# ------------------------------------------------------------------------------------------------ Triton paths
@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("cap", [1 << 25, 3], ids=["buffered", "heavy-tie-fallback"])
def test_triton_many_blocks(monkeypatch, device, scorer, cap):
    """Small blocks: persistent histogram loops, many blocks per tensor, ties spanning blocks and tensors."""
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    monkeypatch.setattr(tselect, "BLOCK", 32)
    monkeypatch.setattr(tselect, "CANDIDATE_CAP", cap)
    gen = torch.Generator().manual_seed(5)
    for kind in ("normal", "quantized", "constant"):
        grads, weights = _data(kind, [(9, 13), (1,), (70,), (0,), (5, 7)], torch.float32, gen)
        grads, weights = [g.to(device) for g in grads], [w.to(device) for w in weights]
        total = sum(w.numel() for w in weights)
        for k in (1, 37, total - 5):
            _check(grads, weights, k, scorer)


def _sampled(monkeypatch, stride=4):
    """The large-call path on small tensors: level 1 from every ``stride``-th block of 32 elements."""
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    monkeypatch.setattr(tselect, "BLOCK", 32)
    monkeypatch.setattr(tselect, "SAMPLE_MIN_BLOCKS", 1)
    monkeypatch.setattr(tselect, "SAMPLE_STRIDE", stride)
    calls = {"exact level 1": 0, "sampled level 1": 0}
    real = tselect._level1_histogram

    def counted(x, stride=1):
        calls["exact level 1" if stride == 1 else "sampled level 1"] += 1
        return real(x, stride)

    monkeypatch.setattr(tselect, "_level1_histogram", counted)
    return calls


# every scorer on normal data; quantized (ties) and constant data on a hashed and a divided key
_SAMPLED_CASES = [(s, "normal") for s in SCORERS] + [
    ("gallop", "quantized"),
    ("random", "quantized"),
    ("gallop", "constant"),
    ("product", "constant"),
]


@pytest.mark.parametrize(("scorer", "kind"), _SAMPLED_CASES, ids=[f"{k}-{s}" for s, k in _SAMPLED_CASES])
def test_triton_sampled_level1_is_exact(monkeypatch, device, scorer, kind):
    """A sampled level 1 only guides the collect pass: the result equals the oracle whether the sample's bin is
    confirmed (the common case) or the exact path reruns."""
    calls = _sampled(monkeypatch)
    gen = torch.Generator().manual_seed(zlib.crc32(f"sampled/{scorer}/{kind}".encode()))
    grads, weights = _data(kind, [(40, 13), (1,), (300,), (0,), (9, 17)], torch.float32, gen)
    grads, weights = [g.to(device) for g in grads], [w.to(device) for w in weights]
    total = sum(w.numel() for w in weights)
    for k in (1, 37, total // 3, total - 5, total):  # confirmed or rerun (a sample this small errs): exact
        _check(grads, weights, k, scorer)
    assert calls["sampled level 1"] == 5  # every call took the large-call path first


@pytest.mark.parametrize("scorer", [s for s in SCORERS if s != "random"])  # random keys hash the index
def test_triton_a_representative_sample_is_confirmed(monkeypatch, device, scorer):
    """When the sampled blocks are representative (here: every block holds the same values, so the sample's
    histogram is the full one scaled), the sample's bin is the k-th key's and the exact level 1 never runs."""
    calls = _sampled(monkeypatch)
    gen = torch.Generator().manual_seed(zlib.crc32(f"confirmed/{scorer}".encode()))
    block_w, block_g = torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    weights = [block_w.repeat(24).to(device), block_w.repeat(8).to(device)]
    grads = [block_g.repeat(24).to(device), block_g.repeat(8).to(device)]
    for k in (5, 100, 250):
        _check(grads, weights, k, scorer)
    assert calls["exact level 1"] == 0


def test_triton_a_misjudged_sampled_bin_falls_back_to_the_exact_path(monkeypatch, device):
    calls = _sampled(monkeypatch)
    real = tselect._level1_histogram

    def shifted(x, stride=1):  # the sample points 8 bins too high: the exact counts must refuse it
        hist = real(x, stride)
        return torch.roll(hist, 8, dims=-1) if stride > 1 else hist

    monkeypatch.setattr(tselect, "_level1_histogram", shifted)
    gen = torch.Generator().manual_seed(3)
    grads, weights = _data("normal", [(50, 11), (77,)], torch.float32, gen)
    _check([g.to(device) for g in grads], [w.to(device) for w in weights], 60, "gallop")
    assert calls["exact level 1"] == 1  # refused, then the exact path ran


@pytest.mark.parametrize("bad", ["nan", "inf", "eps0"])
def test_triton_sampled_level1_finds_a_non_finite_score_in_an_unread_block(monkeypatch, device, bad):
    _sampled(monkeypatch, stride=8)
    weights = [torch.ones(32 * 24, device=device), torch.ones(32 * 40, device=device)]
    grads = [torch.ones_like(w) for w in weights]
    # block 1 of tensor 1 (elements 32..63) is not among every 8th block
    if bad == "eps0":
        weights[1][40], grads[1][40] = 0.0, 0.0  # 0 / (0 + 0) = NaN, a sign-bit key
    else:
        grads[1][40] = float(bad)
    with pytest.raises(ValueError, match=r"scores of tensor 1 contain NaN or Inf"):
        gk.select_topk(grads, weights, 10, eps=0.0 if bad == "eps0" else 1e-8)


@pytest.mark.parametrize("miscount", [+1, -1], ids=["histogram-over", "histogram-under"])
def test_triton_checks_the_candidate_count_and_never_stores_past_the_buffer(monkeypatch, device, miscount):
    """If the histogram and the collect pass ever disagreed on the threshold bin's count, the collect kernel must
    not store past the buffer the histogram sized, and the host must refuse the result (issue 16)."""
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    monkeypatch.setattr(tselect, "BLOCK", 32)
    real = tselect._level1_histogram

    def miscounted(x):  # every finite bin miscounted (the NaN/Inf bins left alone: they would raise first)
        hist = real(x).clone()
        finite = hist[:, : tselect.INVALID_BIN + 1]
        finite += 1 if miscount > 0 else -(finite > 1).to(hist.dtype)
        return hist

    monkeypatch.setattr(tselect, "_level1_histogram", miscounted)
    gen = torch.Generator().manual_seed(1)
    grads, weights = _data("normal", [(40, 9), (33,)], torch.float32, gen)
    with pytest.raises(RuntimeError, match="the two passes must compute the same keys"):
        gk.select_topk([g.to(device) for g in grads], [w.to(device) for w in weights], 50)


def test_triton_int64_indices(monkeypatch, device):
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    monkeypatch.setattr(_common, "INT32_LIMIT", 50)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(49, generator=gen).to(device), torch.randn(77, generator=gen).to(device)]
    grads = [torch.randn(w.shape, generator=gen).to(device) for w in weights]
    got = gk.select_topk(grads, weights, 60)
    assert [g.dtype for g in got] == [torch.int32, torch.int64]
    assert all(torch.equal(g.cpu().long(), w) for g, w in zip(got, brute_force_topk(grads, weights, 60)))


def test_nan_scores_from_eps_zero_are_named_on_both_backends(backend):
    """Issue 20: with eps=0, zero gradients on zero weights score 0/0 = NaN (with its sign bit set on x86); the
    reference raised a bare torch.bincount error, the Triton path the clear one. Now both say the same."""
    w = [torch.ones(6), torch.zeros(5)]
    g = [torch.ones(6), torch.zeros(5)]
    with pytest.raises(ValueError, match=r"tensor 1 contain NaN or Inf.*raise eps"):
        gk.select_topk(g, w, 3, eps=0.0)
    assert [i.tolist() for i in gk.select_topk(g, w, 3, eps=1e-8)] == [[0, 1, 2], []]


@pytest.mark.parametrize("start", [0, 45, 2048 - 64], ids=["first-block", "straddling", "last-block"])
def test_triton_sparse_candidates_with_full_words(monkeypatch, device, start):
    """Candidates rare overall (the word-at-a-time loop, not the dense scan) but 64 of them tied in a row: words
    with all 32 bits set make the candidate loop run its longest, and the ties must still go to the lowest index.
    At this size the host would pick the dense scan (the buffer holds at least 4 blocks' worth), so the spacing
    is lowered to force the loop, and the test checks that the loop is what ran."""
    monkeypatch.setenv("GALLOP_BACKEND", "triton")
    monkeypatch.setattr(tselect, "BLOCK", 32)
    monkeypatch.setattr(tselect, "DENSE_SPACING", 1)
    launched = []
    init = tselect._Collected.__init__

    def spy(self, *args):
        init(self, *args)
        launched.append(self.dense)

    monkeypatch.setattr(tselect._Collected, "__init__", spy)
    gen = torch.Generator().manual_seed(start)
    w = torch.ones(2048, device=device)
    g = (torch.rand(2048, generator=gen) * 0.5).to(device)
    g[start : start + 64] = 2.0
    for k in (1, 64, 70):  # the lowest-index tie, exactly the tied run, past it
        _check([g], [w], k, "gallop")
    assert launched and not any(launched), launched


def test_fast_division_keys_near_a_bin_edge_are_recomputed(device):
    """The collect pass scores gallop keys with the fast division (within 2 ulp of the quotient on a GPU; exact
    under the interpreter) and recomputes a block exactly when any key is within ``_EDGE`` of the edges of the
    threshold bin, or in ranges where the fast division may flush or overflow. This pins which keys count as near."""
    import triton
    import triton.language as tl

    from gallop_kernels import _registry

    if device.type == "cpu" and not _registry.interpreting():
        pytest.skip("runs a Triton kernel on CPU tensors: needs TRITON_INTERPRET=1")

    @triton.jit
    def near(keys_ptr, out_ptr, level, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        keys = tl.load(keys_ptr + offs, mask=offs < n, other=0)
        tl.store(out_ptr + offs, tselect._near_edges(keys, level, tselect.SHIFT1).to(tl.int32), mask=offs < n)

    level, edge = 0x3F9, tselect._EDGE.value
    low, high = level << tselect.SHIFT1, (level + 1) << tselect.SHIFT1
    cases = {  # key -> near?
        low - edge: False, low - edge + 1: True, low: True, low + edge - 1: True, low + edge: False,
        high - edge: False, high - edge + 1: True, high + edge - 1: True, high + edge: False,
        (low + high) // 2: False, 0: False, 1: True, 0x017FFFFF: True, 0x01800000: False,
        0x7E7FFFFF: False, 0x7E800000: True, 0x7F800000: True, -0x400000: True,
    }  # fmt: skip
    keys = torch.tensor(list(cases), dtype=torch.int32, device=device)
    out = torch.empty_like(keys)
    near[(1,)](keys, out, level, keys.numel(), BLOCK=32)
    assert out.bool().tolist() == list(cases.values())
