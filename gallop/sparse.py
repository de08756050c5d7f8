"""SparseModel: train only the selected entries of a model's weights, with the weights kept merged in place.

The mechanism (see docs/architecture.md):

* The model's own weight tensors always hold ``W0 + delta`` (delta is non-zero only at the selected entries), so
  the forward pass is the stock model's, with no overhead.
* For the selected entries there are flat buffers: ``base`` (fp32 copy of the exact pretrained values) and
  ``delta`` (an fp32 ``nn.Parameter``). After every update ``W[idx] = cast(base + delta)``.
* Selected weights get ``requires_grad=True`` and a post-accumulate-grad hook that gathers ``W.grad[idx]`` into
  ``delta.grad`` and frees ``W.grad`` at once; every other parameter gets ``requires_grad=False``.
* Any torch optimizer can update ``delta``: a forward pre-hook (and a state_dict pre-hook) writes the weights
  back when the delta's version counter moved. ``SparseAdamW`` writes back right after its fused step.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterator, Optional

import torch
from torch import nn

import gallop_kernels

from .selection import Selection

GradCallback = Callable[[int, torch.Tensor], None]


class SparseModel:
    """Wraps a model so that only the entries in ``selection`` train; every other weight stays bit-identical.

    Args:
        model: the pretrained model (modified in place: ``requires_grad`` flags, hooks, and the selected weight
            entries once the delta moves). All selected weights must be on one device.
        selection: parameter name -> sorted unique flat indices (from ``gallop.select``).

    ``parameters()`` yields the one trainable fp32 delta, so any torch optimizer works; ``SparseAdamW`` is the
    fused fast path. Call ``merge_and_unload()`` to get the plain fine-tuned model back.
    """

    def __init__(self, model: nn.Module, selection: Selection) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(selection, Selection):
            raise TypeError(f"selection must be a gallop.Selection (from gallop.select), "
                            f"got {type(selection).__name__}")
        if selection.num_selected == 0:
            raise ValueError("selection is empty: nothing to train; select with a larger density")
        params = dict(model.named_parameters())
        names = list(selection)
        for name in names:
            if name not in params:
                raise ValueError(f"selection names {name!r}, which is not a parameter of this model: was it made "
                                 f"for another model?")
            p = params[name]
            if tuple(p.shape) != tuple(selection.shapes[name]):
                raise ValueError(f"selection expects {name!r} of shape {tuple(selection.shapes[name])} but the model's "
                                 f"is {tuple(p.shape)}: was it made for another model?")
            if not p.dtype.is_floating_point:
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; only floating weights can be trained")
            if not p.is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous; call .contiguous() on it first")
        devices = {params[n].device for n in names}
        if len(devices) > 1:
            raise ValueError(f"the selected weights live on several devices ({sorted(map(str, devices))}); "
                             f"SparseModel needs them on one")
        device = devices.pop()
        indices = []
        for name in names:
            idx = selection[name].to(device)
            if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"selection[{name!r}] must be a 1-D int32/int64 tensor")
            numel = params[name].numel()
            if int(idx.min()) < 0 or int(idx.max()) >= numel or bool((idx[1:] <= idx[:-1]).any()):
                raise ValueError(f"selection[{name!r}] must hold sorted unique indices in [0, {numel})")
            indices.append(idx)

        self.model = model
        self.selection = selection
        self._names = names
        self._params = [params[n] for n in names]
        self._indices = indices
        counts = [int(i.numel()) for i in indices]
        self._offsets = [0]
        for c in counts:
            self._offsets.append(self._offsets[-1] + c)
        k = self._offsets[-1]
        self.base = torch.empty(k, dtype=torch.float32, device=device)
        for i, p in enumerate(self._params):
            gallop_kernels.gather(p.detach(), self._indices[i], out=self._slice(self.base, i))
        self.delta = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device))
        self._grad_callback: Optional[GradCallback] = None
        self._merged = True
        self._unloaded = False

        self._saved_flags = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        self._handles = []
        for i, p in enumerate(self._params):
            p.requires_grad_(True)
            self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))
        self._handles.append(model.register_forward_pre_hook(lambda module, args: self.sync()))
        if hasattr(model, "register_state_dict_pre_hook"):
            self._handles.append(model.register_state_dict_pre_hook(lambda *a, **kw: self.sync()))
        self._synced_version = self.delta._version

    # ------------------------------------------------------------------------------------------ internals
    def _slice(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self._offsets[i]: self._offsets[i + 1]]

    def _make_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            dense = p.grad
            p.grad = None
            if dense is None:
                return
            if self._grad_callback is not None:
                self._grad_callback(i, dense)
                return
            if self.delta.grad is None:
                self.delta.grad = torch.zeros_like(self.delta)
            gallop_kernels.gather(dense, self._indices[i], out=self._slice(self.delta.grad, i), accumulate=True)
        return hook

    def _check_live(self) -> None:
        if self._unloaded:
            raise RuntimeError("this SparseModel was unloaded (merge_and_unload); wrap the model again")

    @torch.no_grad()
    def _write(self, values: torch.Tensor, base: Optional[torch.Tensor]) -> None:
        """``W[idx] = cast(base + values)`` (or ``cast(values)``) for every selected tensor, from flat buffers."""
        for i, p in enumerate(self._params):
            gallop_kernels.scatter_(p.detach(), self._indices[i], self._slice(values, i),
                                    base=None if base is None else self._slice(base, i))
        self._synced_version = self.delta._version

    # ------------------------------------------------------------------------------------------ public
    @property
    def num_selected(self) -> int:
        """The number of trainable entries."""
        return self.delta.numel()

    @property
    def merged(self) -> bool:
        """Whether the model's weights currently hold ``base + delta`` (else the pretrained ``base``)."""
        return self._merged

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The trainable parameters: one flat fp32 delta over all selected entries."""
        yield self.delta

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        yield (prefix + "delta", self.delta)

    def named_deltas(self) -> "OrderedDict[str, torch.Tensor]":
        """Parameter name -> view of its slice of the flat delta."""
        return OrderedDict((n, self._slice(self.delta.detach(), i)) for i, n in enumerate(self._names))

    @torch.compiler.disable  # eager bookkeeping: a compiled forward must not trace (and recompile) the write loop
    def sync(self) -> None:
        """Write ``cast(base + delta)`` into the weights if the delta changed since the last write (and merged)."""
        if self._merged and not self._unloaded and self.delta._version != self._synced_version:
            self._write(self.delta.detach(), self.base)

    def merge(self) -> nn.Module:
        """Make the weights hold ``cast(base + delta)`` (the default state); returns the model."""
        self._check_live()
        self._merged = True
        self._write(self.delta.detach(), self.base)
        return self.model

    def unmerge(self) -> nn.Module:
        """Restore the exact pretrained weights (bit-identical); the delta is kept. ``merge()`` re-applies it."""
        self._check_live()
        self._write(self.base, None)
        self._merged = False
        return self.model

    def merge_and_unload(self) -> nn.Module:
        """Merge the delta, remove every hook, restore ``requires_grad`` flags; returns the plain model."""
        self._check_live()
        self.merge()
        for h in self._handles:
            h.remove()
        self._handles = []
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
            p.grad = None
        self._unloaded = True
        return self.model

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none:
            self.delta.grad = None
        elif self.delta.grad is not None:
            self.delta.grad.zero_()

    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the sparse gradient (0 when there is none)."""
        if self.delta.grad is None:
            return torch.zeros((), device=self.delta.device)
        return torch.linalg.vector_norm(self.delta.grad)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the sparse gradient; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_([self.delta], max_norm)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True) -> "SparseModel":
        self.model.train(mode)
        return self

    def eval(self) -> "SparseModel":
        self.model.eval()
        return self

    def save_pretrained(self, directory, *, precision: str = "bf16") -> None:
        """Save the adapter (indices gap-encoded, values in ``bf16`` or lossless ``fp32``); see ``gallop.io``."""
        from .io import save_adapter

        save_adapter(self, directory, precision=precision)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory) -> "SparseModel":
        """Load an adapter saved by ``save_pretrained`` onto its base model (checked by fingerprint)."""
        from .io import load_adapter

        return load_adapter(model, directory)

    def __repr__(self) -> str:
        total = sum(p.numel() for p in self.model.parameters())
        state = "unloaded" if self._unloaded else ("merged" if self._merged else "unmerged")
        return (f"SparseModel({type(self.model).__name__}: {self.num_selected:,} of {total:,} weights trainable "
                f"({100 * self.num_selected / max(1, total):.3f}%) in {len(self._names)} tensors, "
                f"scorer={self.selection.config.scorer!r}, {state})")
