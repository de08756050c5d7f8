"""Brute-force oracles the kernels are held to: they materialize everything and sort, so keep inputs small."""

import torch

from gallop_kernels.select_topk import reference


def brute_force_topk(grads, weights, k, scorer="gallop", eps=1e-8, seed=0):
    """Stable sort of every score (fp64 of the fp32 score), ties to the lower (tensor position, flat index)."""
    all_s, all_t, all_i = [], [], []
    for t, w in enumerate(weights):
        g = None if grads is None else grads[t]
        s = reference.scores(g, w, scorer, eps, seed, t).reshape(-1).to(torch.float64).cpu()
        all_s.append(s)
        all_t.append(torch.full((s.numel(),), t, dtype=torch.int64))
        all_i.append(torch.arange(s.numel(), dtype=torch.int64))
    s, tpos, idx = torch.cat(all_s), torch.cat(all_t), torch.cat(all_i)
    order = torch.sort(-s, stable=True).indices[:k]  # cat order is (tensor, index) order, so stable = the tie rule
    return [torch.sort(idx[order][tpos[order] == t]).values for t in range(len(weights))]
