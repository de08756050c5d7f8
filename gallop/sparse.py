"""SparseModel: an ``nn.Module`` that trains only the selected entries of a model's weights.

The mechanism (docs/architecture.md, "Phase 2"):

* **The wrapper's parameters are exactly the trainable state.** Each selected weight gets an fp32 delta, an
  ``nn.Parameter`` of its ``k`` selected entries, registered under the weight's own name (``sparse.deltas.<name>``)
  and on the module that owns the weight (``gallop_delta``). They are the only parameters that require grad, so
  ``sparse.parameters()``, ``zero_grad``, ``clip_grad_norm_``, any optimizer, a Trainer, DDP and accelerate all see
  the deltas and nothing else. ``sparse.state_dict()`` holds the deltas and a selection fingerprint: a
  checkpoint of the wrapper is an adapter, not a copy of the model (``sparse.model.state_dict()`` is the model).
* **Weights stay merged in place.** The model's weights hold ``cast(base + delta)`` at the selected entries, so
  the forward pass is the stock matmul. ``base`` (the exact pretrained values, fp32) and the indices live on the
  owning module as non-persistent buffers, so they move with it.
* **Delta gradients come from autograd** (``gallop.layers``): each selected module runs a custom autograd
  function whose backward computes the weight gradient at the selected entries only. No dense weight requires
  grad or gets a ``.grad``.
* **Write-back.** After any torch optimizer's step (``SparseAdamW`` or not), a global optimizer step post-hook
  writes ``cast(base + delta)`` into the weights for every delta that optimizer holds, unconditionally (a fused
  torch optimizer moves no version counter). A forward pre-hook and a state_dict pre-hook on the model catch any
  other change (an in-place edit of a delta) through the deltas' version counters. Non-finite deltas are refused.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import math
import numbers
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import gallop_kernels

from . import layers
from .checkpointing import inputs_require_grad
from .selection import Selection

logger = logging.getLogger(__name__)


@dataclass
class TargetState:
    """One selected weight, as saving needs it (CPU tensors)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    indices: torch.Tensor  # int64, sorted
    base: torch.Tensor  # fp32 exact pretrained values
    delta: torch.Tensor  # fp32
    values: torch.Tensor  # cast(base + delta) in the weight's dtype: what the merged weight holds


class _Target:
    """Bookkeeping for one selected weight: its parameter, the modules that own it, its delta."""

    def __init__(self, name: str, weight: nn.Parameter, modules: list[nn.Module], delta: nn.Parameter) -> None:
        self.name = name
        self.weight = weight
        self.modules = modules
        self.delta = delta
        self.synced_version = -1

    @property
    def owner(self) -> nn.Module:
        return self.modules[0]

    @property
    def indices(self) -> torch.Tensor:
        return getattr(self.owner, layers.INDICES)

    @property
    def base(self) -> torch.Tensor:
        return getattr(self.owner, layers.BASE)


def _modules_owning(model: nn.Module) -> dict[int, list[nn.Module]]:
    """id(weight parameter) -> the modules holding it as their ``weight`` (several when tied)."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        w = module._parameters.get("weight")
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), [])
            if all(m is not module for m in owners[id(w)]):
                owners[id(w)].append(module)
    return owners


def selection_fingerprint(names: list[str], indices: list[torch.Tensor]) -> int:
    """A 56-bit fingerprint of (names, indices): equal selections give equal values on every rank and machine."""
    h = hashlib.sha256()
    for name, idx in zip(names, indices):
        h.update(name.encode())
        h.update(b"\0")
        h.update(idx.detach().to(torch.int64).cpu().numpy().tobytes())
        h.update(b"\1")
    return int.from_bytes(h.digest()[:7], "little")


def _check_selection(model: nn.Module, selection: Selection) -> tuple[list[str], dict[str, nn.Parameter], list]:
    """Everything SparseModel checks before it touches the model; returns (names, params, per-name indices)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, SparseModel):
        raise ValueError(
            "model is already a SparseModel; wrap the plain model (sparse.model), or call merge_and_unload() first"
        )
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be a gallop.Selection (from gallop.select), got {type(selection).__name__}")
    if selection.num_selected == 0:
        raise ValueError("selection is empty: nothing to train; select with a larger density")
    if any(layers.is_installed(m) for m in model.modules()):
        raise ValueError(
            "this model is already wrapped by a SparseModel (its modules carry gallop deltas): call "
            "merge_and_unload() on that wrapper first, or keep using it"
        )
    params = dict(model.named_parameters())
    names = list(selection)
    indices = []
    for name in names:
        if name not in params:
            raise ValueError(
                f"selection names {name!r}, which is not a parameter of this model: was it made for another model?"
            )
        p = params[name]
        if tuple(p.shape) != tuple(selection.shapes[name]):
            raise ValueError(
                f"selection expects {name!r} of shape {tuple(selection.shapes[name])} but the model's is "
                f"{tuple(p.shape)}: was it made for another model?"
            )
        if not p.dtype.is_floating_point:
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; only floating weights can be trained")
        if not p.is_contiguous():
            raise ValueError(f"parameter {name!r} is not contiguous; call .contiguous() on it first")
        idx = selection[name]
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"selection[{name!r}] must be a 1-D int32/int64 tensor")
        numel = p.numel()
        cpu = idx.to("cpu", torch.int64)
        if int(cpu.min()) < 0 or int(cpu.max()) >= numel or bool((cpu[1:] <= cpu[:-1]).any()):
            raise ValueError(f"selection[{name!r}] must hold sorted unique indices in [0, {numel})")
        indices.append(idx)
    devices = {params[n].device for n in names}
    if len(devices) > 1:
        raise ValueError(
            f"the selected weights live on several devices ({sorted(map(str, devices))}); SparseModel "
            f"needs them on one (load the model without a multi-device device_map)"
        )
    return names, params, indices


def _check_owners(names: list[str], params: dict, owners: dict[int, list[nn.Module]]) -> dict[str, list[nn.Module]]:
    """name -> the modules whose ``weight`` it is; raises if a weight has none, or one is not a plain module."""
    out = {}
    for name in names:
        mods = owners.get(id(params[name]), [])
        if not mods:
            raise ValueError(
                f"{name!r} is not the weight of any module, so GaLLoP cannot route its gradient; exclude "
                f"it from target_modules"
            )
        for m in mods:
            if layers.has_own_forward(m):
                raise ValueError(
                    f"the module owning {name!r} has its forward replaced on the instance (accelerate "
                    f"hooks or another adapter); GaLLoP needs plain modules: load the model without "
                    f"offloading hooks"
                )
        out[name] = mods
    return out


def _delta_tree(names: list[str]) -> nn.Module:
    """Empty containers mirroring each selected weight's module path (``deltas.model.layers.0...``); the delta
    parameters are registered in them later."""
    root = nn.Module()
    for name in names:
        parent = root
        for part in name.split(".")[:-1]:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                try:
                    parent.add_module(part, child)
                except KeyError as e:
                    raise ValueError(f"the parameter name {name!r} cannot be mirrored as a module path ({e})") from None
            parent = child
    return root


def _check_same_selection_on_all_ranks(fingerprint: int, k: int, device: torch.device, group) -> None:
    """One all-reduce: raise on every rank if any two ranks hold different selections."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    on = device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    v = torch.tensor([fingerprint, k, -fingerprint, -k], dtype=torch.int64, device=on)
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=group)
    if int(v[0]) != fingerprint or int(v[1]) != k or int(v[2]) != -fingerprint or int(v[3]) != -k:
        raise RuntimeError(
            f"the ranks hold different GaLLoP selections (rank {dist.get_rank(group)}: {k:,} entries, fingerprint "
            f"{fingerprint:014x}): select once with mean_gradients(..., group) so every rank averages the same "
            f"gradient, or select on rank 0 and broadcast the Selection"
        )


_LIVE: weakref.WeakSet[SparseModel] = weakref.WeakSet()  # every SparseModel not yet unloaded


def _after_any_optimizer_step(optimizer, args, kwargs) -> None:
    """A global optimizer step post-hook: after any torch optimizer steps, every live SparseModel writes back the
    deltas that optimizer holds. Unconditionally: a fused torch optimizer moves no version counter."""
    live = list(_LIVE)
    if not live:
        return
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    finite = bool(getattr(optimizer, "keeps_deltas_finite", False))
    for sparse in live:
        sparse._write_after_step(ids, deltas_finite=finite)


@functools.cache
def _install_optimizer_hook() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_after_any_optimizer_step)


@functools.cache
def _wrapper_class(model_cls: Any) -> type:
    """``SparseModel`` specialised to ``model_cls``: its ``forward`` shows the model's signature, so tools that
    read it (the Trainer's label names and dataset columns) see the model's arguments."""
    signature = inspect.signature(model_cls.forward)

    def forward(self, *args, **kwargs):
        return SparseModel.forward(self, *args, **kwargs)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = SparseModel.forward.__doc__
    name = f"SparseModel[{model_cls.__name__}]"
    return type(name, (SparseModel,), {"forward": forward, "__module__": __name__, "__qualname__": name})


def _rebuild(model_cls: type) -> SparseModel:
    cls = _wrapper_class(model_cls)
    return SparseModel.__new__(cls)


class SparseModel(nn.Module):
    """Wraps a model so that only the entries in ``selection`` train; every other weight stays bit-identical.

    Args:
        model: the pretrained model, modified in place: every parameter gets ``requires_grad=False``, each selected
            module gets a ``gallop_delta`` parameter, two buffers and a sparse forward, and the selected weight
            entries move as the deltas train. ``merge_and_unload()`` undoes all of it but the trained values.
        selection: parameter name -> sorted unique flat indices (from ``gallop.select``).
        process_group: under torch.distributed, the group whose ranks must hold the same selection (checked with
            one all-reduce of a fingerprint; default: the world).

    Behaves like the model (attributes, ``config``, ``generate`` fall through to it, as with PEFT's ``PeftModel``).
    ``parameters()`` are the fp32 deltas only, so any optimizer, a plain ``transformers.Trainer``, DDP and
    accelerate train exactly the selected entries; ``SparseAdamW`` is the fused fast path.
    """

    selection_fingerprint: torch.Tensor

    def __init__(self, model: nn.Module, selection: Selection, *, process_group: Any = None) -> None:
        names, params, indices = _check_selection(model, selection)
        owners = _check_owners(names, params, _modules_owning(model))
        deltas = _delta_tree(names)  # built first: a name that cannot be a module path fails before any change
        device = params[names[0]].device
        fingerprint = selection_fingerprint(names, indices)
        _check_same_selection_on_all_ranks(fingerprint, sum(int(i.numel()) for i in indices), device, process_group)

        # ---- every check passed: from here on the model is modified ----
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: the wrapper's state is the deltas only
        self.selection = selection
        self._unloaded = False
        self._merged = True
        self.register_buffer("selection_fingerprint", torch.tensor([fingerprint], dtype=torch.int64, device=device))
        self.deltas = deltas
        self._saved_flags = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        self._targets = self._attach_targets(
            names, params, [i.to(device).contiguous() for i in indices], owners, device
        )
        self._guarded = self._guard_modules()
        self._install_hooks()
        self.__class__ = _wrapper_class(type(model))  # type: ignore[arg-type]

    def _attach_targets(self, names, params, indices, owners, device) -> list[_Target]:
        """One flat fp32 base and one flat fp32 delta storage; per weight, its slices registered as the delta
        parameter (here and on its owning modules) and the module's buffers, and the module's sparse forward."""
        k = sum(int(i.numel()) for i in indices)
        flat_base = torch.empty(k, dtype=torch.float32, device=device)
        flat_delta = torch.zeros(k, dtype=torch.float32, device=device)
        targets = []
        offset = 0
        for name, idx in zip(names, indices):
            n = int(idx.numel())
            base = flat_base[offset : offset + n]
            gallop_kernels.gather(params[name].detach(), idx, out=base, check_indices=False)
            delta = nn.Parameter(flat_delta[offset : offset + n])
            self.deltas.get_submodule(name.rpartition(".")[0]).register_parameter(name.rpartition(".")[2], delta)
            for m in owners[name]:
                layers.install(m, delta, idx, base)
            targets.append(_Target(name, params[name], owners[name], delta))
            offset += n
        for t in targets:
            t.synced_version = t.delta._version
        return targets

    def _guard_modules(self) -> list[nn.Module]:
        """Every module that holds or contains a selected module refuses dtype casts (``layers.guard``)."""
        named = dict(self._model.named_modules())
        paths = {""}
        for name, m in named.items():
            if layers.is_installed(m):
                parts = name.split(".") if name else []
                paths.update(".".join(parts[:i]) for i in range(len(parts) + 1))
        modules = [named[p] for p in paths if p in named]
        for m in modules:
            layers.guard(m)
        return modules

    def _install_hooks(self) -> None:
        """The write-back hooks on the model, the state-dict checks, and the global optimizer step hook."""
        self._handles = [
            self._model.register_forward_pre_hook(self._pre_forward_hook),
            self._model.register_state_dict_pre_hook(self._state_dict_hook),
        ]
        embeddings_hook = inputs_require_grad(self._model)  # reentrant checkpointing of a frozen model
        if embeddings_hook is not None:
            self._handles.append(embeddings_hook)
        self._register_load_state_dict_pre_hook(self._check_loaded_fingerprint)
        self.register_load_state_dict_post_hook(self._after_load)
        _install_optimizer_hook()
        _LIVE.add(self)

    # ------------------------------------------------------------------------------------------ nn.Module plumbing
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            model = self.__dict__.get("_model")
            if model is None:
                raise
            return getattr(model, name)

    def __reduce_ex__(self, protocol):
        return (_rebuild, (type(self._model),), self.__getstate__())

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if not self._unloaded:
            _install_optimizer_hook()
            _LIVE.add(self)

    def forward(self, *args, **kwargs):
        """Calls the wrapped model (the weights are written back first if a delta changed)."""
        self._check_live()
        return self._model(*args, **kwargs)

    def train(self, mode: bool = True) -> SparseModel:
        super().train(mode)
        self._model.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True):
        if self.__dict__.get("_model") is None or self._unloaded:
            return super()._apply(fn, recurse)
        layers.check_keeps_dtypes(fn, self._targets[0].delta.device, "a SparseModel")
        self._model._apply(fn, recurse)
        super()._apply(fn, recurse)
        self._reflatten()
        return self

    def _reflatten(self) -> None:
        """Put the deltas back into one flat storage (a device move gives every parameter its own)."""
        deltas = [t.delta for t in self._targets]
        flat = torch.cat([d.detach().reshape(-1) for d in deltas])
        offset = 0
        with torch.no_grad():
            for d in deltas:
                d.data = flat[offset : offset + d.numel()]
                offset += d.numel()
        for t in self._targets:
            t.synced_version = -1  # write back at the next forward: a move may have reset the version counters

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The trainable state: every delta (fp32, under ``deltas.<weight name>``) and the selection fingerprint.

        It is the adapter in torch form (a Trainer checkpoint of the wrapper holds ``k`` numbers, not the model);
        ``load_state_dict`` accepts it only for the same selection. ``sparse.model.state_dict()`` is the model.
        """
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not keep_vars:
            for key in [k for k in out if k.startswith(prefix)]:
                out[key] = out[key].clone()  # own storage each: safetensors refuses tensors that share memory
        return out

    def _check_loaded_fingerprint(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        self._check_new_deltas(
            {
                t.name: state_dict[prefix + "deltas." + t.name]
                for t in self._targets
                if prefix + "deltas." + t.name in state_dict
            },
            "state_dict",
        )
        key = prefix + "selection_fingerprint"
        if key in state_dict:
            loaded = int(state_dict[key].reshape(-1)[0])
            mine = int(self.selection_fingerprint.reshape(-1)[0])
            if loaded != mine:
                raise ValueError(
                    f"this state dict was saved for another GaLLoP selection (fingerprint {loaded:014x}, "
                    f"this SparseModel has {mine:014x}): load it onto a SparseModel built with the same "
                    f"selection, e.g. SparseModel.from_pretrained on a saved adapter"
                )

    def _check_new_deltas(self, deltas: Mapping[str, torch.Tensor], argument: str) -> None:
        """Refuse (before anything is copied) deltas that hold NaN or Inf, or whose merged value overflows an fp16
        weight: loading them would put a non-finite value into the weights."""
        by_name = {t.name: t for t in self._targets}
        checked = []
        for name, d in deltas.items():
            t = by_name[name]
            if not isinstance(d, torch.Tensor) or d.numel() != t.delta.numel():
                continue  # load_state_dict / load_deltas_ report the shape themselves
            checked.append(
                (name, t, self._bad_entries(t, False, d.detach().reshape(-1).to(t.delta.device, torch.float32)))
            )
        if not checked or bool(torch.stack([c for _, _, checks in checked for c in checks]).all()):  # one sync
            return
        for name, t, checks in checked:
            if not all(bool(c) for c in checks):
                raise ValueError(
                    f"{argument} holds NaN or Inf for the delta of {name!r} (or base + delta overflows its "
                    f"{t.weight.dtype} weight); nothing was loaded. Load a checkpoint saved before training diverged"
                )

    def _after_load(self, module, incompatible_keys) -> None:
        for t in self._targets:
            t.synced_version = -1
        self.sync()

    # ------------------------------------------------------------------------------------------ write-back
    @torch.compiler.disable  # eager bookkeeping: compiled graphs must not trace (and recompile on) the write loop
    def _pre_forward_hook(self, module, args) -> None:
        if not self._merged and torch.is_grad_enabled() and module.training:
            raise RuntimeError(
                "the SparseModel is unmerged (its weights hold the pretrained values), so training now "
                "would compute gradients at the wrong point: call merge() before training (unmerged "
                "evaluation under torch.no_grad() or model.eval() is fine)"
            )
        self.sync()

    def _state_dict_hook(self, *args, **kwargs) -> None:
        self.sync()

    @torch.compiler.disable
    def sync(self) -> None:
        """Write ``cast(base + delta)`` into the weights for every delta changed since its last write (if merged).

        Raises ``FloatingPointError`` (writing nothing) when a changed delta holds NaN or Inf.
        """
        if self._unloaded or not self._merged:
            return
        changed = [t for t in self._targets if t.delta._version != t.synced_version]
        if not changed:
            return
        self._check_finite(changed)
        self._write(changed)

    def _write_after_step(self, param_ids: set, deltas_finite: bool) -> None:
        if self._unloaded or not self._merged:
            return
        targets = [t for t in self._targets if id(t.delta) in param_ids]
        if targets:
            self._check_finite(targets, deltas_finite)
            self._write(targets)

    @staticmethod
    def _bad_entries(t: _Target, deltas_finite: bool, delta: torch.Tensor | None = None) -> list[torch.Tensor]:
        """0-d bool tensors, all True when writing ``cast(base + delta)`` (default: the target's own delta) puts
        no NaN or Inf into the weight."""
        d = t.delta.detach() if delta is None else delta
        checks = [] if deltas_finite else [torch.isfinite(d).all()]
        if t.weight.dtype == torch.float16:  # the one weight dtype a finite fp32 sum can overflow
            checks.append(torch.isfinite((t.base + d).to(torch.float16)).all())
        return checks

    def _check_finite(self, targets, deltas_finite: bool = False) -> None:
        """Raise ``FloatingPointError`` (writing nothing) for a non-finite delta, or a merged value that overflows an
        fp16 weight: the weights never receive NaN or Inf. One device sync."""
        checks = [c for t in targets for c in self._bad_entries(t, deltas_finite)]
        if not checks or bool(torch.stack(checks).all()):
            return
        bad = [t.name for t in targets if not all(bool(c) for c in self._bad_entries(t, deltas_finite))]
        raise FloatingPointError(
            f"the deltas of {len(bad)} selected weights hold NaN or Inf, or overflow the weight's dtype (first: "
            f"{bad[0]!r}), so they were not written into the weights (which still hold the last finite values). An "
            f"optimizer stepped on a non-finite gradient or diverged: use gallop.SparseAdamW (it skips non-finite "
            f"steps) or lower the learning rate"
        )

    def write_back(self) -> None:
        """Write ``cast(base + delta)`` into every selected weight now (what ``SparseAdamW`` calls after a step)."""
        self._check_live()
        if self._merged:
            self._write(self._targets)

    @torch.no_grad()
    def _write(self, targets) -> None:
        for t in targets:
            if t.delta.dtype != torch.float32 or t.base.dtype != torch.float32:
                raise RuntimeError(
                    f"the delta or base of {t.name!r} was cast to {t.delta.dtype}/{t.base.dtype}; "
                    f"GaLLoP keeps them in fp32: cast the model before wrapping it"
                )
            gallop_kernels.scatter_(
                t.weight.detach(),
                t.indices,
                t.delta.detach(),
                base=t.base,
                check_indices=False,
                nonfinite="assume_finite",
            )
            t.synced_version = t.delta._version

    # ------------------------------------------------------------------------------------------ public API
    @property
    def model(self) -> nn.Module:
        """The wrapped model."""
        return self._model

    def get_base_model(self) -> nn.Module:
        """The wrapped model (PEFT's name for it)."""
        return self._model

    @property
    def num_selected(self) -> int:
        """The number of trainable entries (k)."""
        return sum(t.delta.numel() for t in self._targets)

    @property
    def merged(self) -> bool:
        """Whether the model's weights currently hold ``cast(base + delta)`` (else the pretrained ``base``)."""
        return self._merged

    @property
    def unloaded(self) -> bool:
        return self._unloaded

    @property
    def target_names(self) -> list[str]:
        """The selected weights' names, in selection order."""
        return [t.name for t in self._targets]

    def named_deltas(self) -> OrderedDict[str, nn.Parameter]:
        """Weight name -> its trainable fp32 delta (the parameters, in selection order)."""
        return OrderedDict((t.name, t.delta) for t in self._targets)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The deltas, in selection order (what an optimizer should train)."""
        return [t.delta for t in self._targets]

    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of the deltas' gradients (0 when there are none)."""
        grads = [t.delta.grad for t in self._targets if t.delta.grad is not None]
        if not grads:
            return torch.zeros((), device=self._targets[0].delta.device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the deltas' gradients; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm)

    def print_trainable_parameters(self) -> None:
        """Print the trainable count against the model's total, as PEFT does."""
        total = sum(p.numel() for p in self._model.parameters())  # the deltas included, as PEFT counts
        print(
            f"trainable params: {self.num_selected:,} || all params: {total:,} || "
            f"trainable%: {100 * self.num_selected / max(1, total):.4f}"
        )

    def merge(self) -> nn.Module:
        """Make the weights hold ``cast(base + delta)`` (the default state); returns the model."""
        self._check_live()
        self._merged = True
        self._write(self._targets)
        return self._model

    def unmerge(self) -> nn.Module:
        """Restore the exact pretrained weights (bit-identical); the deltas are kept and ``merge()`` re-applies
        them. Training while unmerged raises; evaluation (``no_grad`` or eval mode) is fine."""
        self._check_live()
        with torch.no_grad():
            for t in self._targets:
                gallop_kernels.scatter_(
                    t.weight.detach(), t.indices, t.base, check_indices=False, nonfinite="assume_finite"
                )
        self._merged = False
        return self._model

    def merge_and_unload(self) -> nn.Module:
        """Merge the deltas, remove the delta state, the sparse forwards and the hooks, restore the
        ``requires_grad`` flags; returns the plain fine-tuned model. The wrapper cannot be used afterwards."""
        self._check_live()
        self.sync()
        if not self._merged:
            self.merge()
        for h in self._handles:
            h.remove()
        self._handles = []
        for t in self._targets:
            for m in t.modules:
                layers.uninstall(m)
        for m in self._guarded:
            layers.unguard(m)
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self._unloaded = True
        _LIVE.discard(self)
        return self._model

    def _check_live(self) -> None:
        if self._unloaded:
            raise RuntimeError("this SparseModel was unloaded (merge_and_unload); wrap the model again to train it")

    def export_state(self) -> list[TargetState]:
        """Per selected weight: name, shape, dtype, indices, base, delta and merged values, on the CPU."""
        self._check_live()
        out = []
        for t in self._targets:
            base = t.base.detach().cpu()
            delta = t.delta.detach().cpu()
            out.append(
                TargetState(
                    t.name,
                    tuple(t.weight.shape),
                    t.weight.dtype,
                    t.indices.to("cpu", torch.int64),
                    base,
                    delta.clone(),
                    (base + delta).to(t.weight.dtype),
                )
            )
        return out

    @torch.no_grad()
    def load_deltas_(self, deltas: Mapping[str, torch.Tensor]) -> None:
        """Set every delta from ``deltas[name]`` (fp32, ``k`` entries each) and write the weights back."""
        self._check_live()
        for t in self._targets:
            if t.name not in deltas or deltas[t.name].numel() != t.delta.numel():
                raise ValueError(f"deltas must hold {t.delta.numel()} entries for {t.name!r}")
        self._check_new_deltas({t.name: deltas[t.name] for t in self._targets}, "deltas")
        for t in self._targets:
            t.delta.copy_(deltas[t.name].reshape(-1).to(t.delta.device, torch.float32))
        if self._merged:
            self._write(self._targets)

    def set_values_(self, values: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor] | None = None) -> None:
        """Make every selected entry hold exactly ``values[name]`` (in the weight's dtype), and set the deltas.

        With ``deltas`` (fp32) they are used as they are, after checking that ``cast(base + delta) == values``.
        Without, each delta is reconstructed so that ``cast(base + delta)`` reproduces the value exactly, so
        training can continue from the loaded state. Nothing changes if any check fails.
        """
        self._check_live()
        out = {}
        for t in self._targets:
            if t.name not in values:
                raise ValueError(f"values has no entry for the selected weight {t.name!r}")
            d = None if deltas is None else deltas.get(t.name)
            out[t.name] = deltas_for_values(
                t.name,
                values[t.name].to(t.base.device),
                t.base,
                t.weight.dtype,
                None if d is None else d.to(t.base.device),
            )
        self.load_deltas_(out)

    # ------------------------------------------------------------------------------------------ adapters
    def save_pretrained(
        self,
        directory,
        *,
        save_deltas: bool = False,
        precision: str | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """Save the adapter to ``directory`` (PEFT's layout; see ``gallop.adapters``), atomically.

        The trained entries are stored in the weight's own dtype, so ``from_pretrained`` onto the pretrained model
        reproduces the trained weights bit for bit (2 bytes an entry for bf16, 4 for fp32, plus about 2 for the
        index). ``save_deltas=True`` also stores the fp32 deltas (4 bytes more an entry) to resume training
        exactly. ``precision`` is the 0.1 spelling (``"fp32"`` = ``save_deltas=True``, ``"bf16"`` = the default).
        ``metrics`` (name -> number) go into the config and the model card. A NaN or Inf entry is refused.
        """
        from . import adapters

        self._check_live()
        if precision is not None:
            if precision not in ("bf16", "fp32"):
                raise ValueError(f"precision must be 'bf16' or 'fp32' (or use save_deltas=True), got {precision!r}")
            save_deltas = save_deltas or precision == "fp32"
        stored_metrics = None if metrics is None else _checked_metrics(metrics)  # refused before anything is written
        self.sync()
        states = self.export_state()
        config = self.adapter_config(states)
        if stored_metrics:
            config["metrics"] = stored_metrics
        tensors = [
            adapters.AdapterTensor(s.name, s.shape, s.dtype, s.indices, s.values, s.delta if save_deltas else None)
            for s in states
        ]
        adapters.write_adapter(directory, tensors, config, model_card=adapters.model_card(config))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload GaLLoP adapter",
        revision: str | None = None,
        save_deltas: bool = False,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """Save the adapter (as ``save_pretrained`` does) and upload the folder to the Hub repository ``repo_id``
        (created if needed) with ``huggingface_hub``."""
        import tempfile

        from huggingface_hub import HfApi

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, save_deltas=save_deltas, metrics=metrics)
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision, repo_type="model"
            )

    def adapter_config(self, states: list[TargetState] | None = None) -> dict:
        """The config an adapter of this SparseModel records (without the per-tensor part)."""
        from . import adapters

        states = self.export_state() if states is None else states
        mc = getattr(self._model, "config", None)
        return {
            "base_model_name_or_path": getattr(mc, "_name_or_path", None) or None,
            "revision": getattr(mc, "_commit_hash", None),
            "gallop_version": _version(),
            "gallop_config": self.selection.config.to_dict(),
            "num_selected": self.num_selected,
            "num_eligible": self.selection.num_eligible,
            "num_parameters": sum(p.numel() for p in self._model.parameters()) - self.num_selected,
            "eligible_shapes": {n: list(s) for n, s in self.selection.shapes.items()},
            "base_fingerprint": adapters.base_fingerprint(
                [s.name for s in states], [s.shape for s in states], [s.dtype for s in states], [s.base for s in states]
            ),
        }

    def load_adapter_(self, directory) -> None:
        """Load the trained entries of an adapter saved from a SparseModel with this same selection and base
        (e.g. a checkpoint, to resume): its fp32 deltas when stored, else deltas reproducing its values."""
        from . import adapters

        adapter = adapters.read_adapter(directory)
        names = [t.name for t in adapter.tensors]
        if names != self.target_names or any(
            not torch.equal(a.indices, t.indices.to("cpu", torch.int64)) for a, t in zip(adapter.tensors, self._targets)
        ):
            raise ValueError(
                f"the adapter in {str(directory)!r} was saved for another selection: load it with "
                f"SparseModel.from_pretrained(base_model, path) instead"
            )
        states = self.export_state()
        fingerprint = adapters.base_fingerprint(
            names, [s.shape for s in states], [s.dtype for s in states], [s.base for s in states]
        )
        if fingerprint != adapter.config["base_fingerprint"]:
            raise ValueError(f"the adapter in {str(directory)!r} was trained on another base model")
        deltas = {}
        for a, t in zip(adapter.tensors, self._targets):
            values = a.values if a.values is not None else (t.base.cpu() + _stored(a.deltas)).to(a.dtype)
            deltas[a.name] = deltas_for_values(
                a.name,
                values.to(t.base.device),
                t.base,
                a.dtype,
                None if a.deltas is None else a.deltas.to(t.base.device),
            )
        self.load_deltas_(deltas)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory, *, revision: str | None = None, process_group: Any = None
    ) -> SparseModel:
        """Wrap ``model`` (the pretrained base, unmodified) with the adapter in ``directory`` (a folder, or a Hub
        repo id resolved through ``huggingface_hub``).

        Everything is checked before the model is touched: names, shapes, dtypes, index ranges, the data checksum,
        and the fingerprint of the base weights at the selected entries (which fails on another base model, or on
        a model that already has this adapter merged). The loaded weights equal the trained ones bit for bit.
        """
        from . import adapters
        from .config import GallopConfig

        adapter = adapters.read_adapter(_resolve_adapter_path(directory, revision))
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = dict(model.named_parameters())
        indices, bases = OrderedDict(), []
        for t in adapter.tensors:
            if t.name not in params:
                raise ValueError(f"the adapter trains {t.name!r}, which this model does not have: wrong base model")
            p = params[t.name]
            if tuple(p.shape) != t.shape or p.dtype != t.dtype:
                raise ValueError(
                    f"the adapter expects {t.name!r} as {t.dtype}{list(t.shape)} but the model has "
                    f"{p.dtype}{list(p.shape)}: wrong base model or dtype (load the model with "
                    f"dtype={t.dtype})"
                )
            if t.indices.numel() and int(t.indices[-1]) >= p.numel():
                raise ValueError(f"the adapter's indices for {t.name!r} run past the weight: the adapter is damaged")
            idx = t.indices.to(p.device, gallop_kernels.index_dtype(p.numel()))
            indices[t.name] = idx
            bases.append(gallop_kernels.gather(p.detach(), idx, check_indices=False))
        names = [t.name for t in adapter.tensors]
        fingerprint = adapters.base_fingerprint(
            names, [t.shape for t in adapter.tensors], [t.dtype for t in adapter.tensors], bases
        )
        if fingerprint != adapter.config["base_fingerprint"]:
            raise ValueError(
                "the model's weights at the adapter's entries differ from the base it was trained on: "
                "wrong base model, or an adapter is already merged into it (load onto the pristine base)"
            )
        deltas = {}
        for t, base in zip(adapter.tensors, bases):
            values = t.values if t.values is not None else (base.cpu() + _stored(t.deltas)).to(t.dtype)
            deltas[t.name] = deltas_for_values(
                t.name, values.to(base.device), base, t.dtype, None if t.deltas is None else t.deltas.to(base.device)
            )
        shapes = adapter.config.get("eligible_shapes") or {t.name: list(t.shape) for t in adapter.tensors}
        selection = Selection(
            indices,
            OrderedDict((n, tuple(s)) for n, s in shapes.items()),
            GallopConfig.from_dict(adapter.config["gallop_config"]),
        )
        sparse = cls(model, selection, process_group=process_group)
        sparse.load_deltas_(deltas)
        return sparse


def deltas_for_values(
    name: str, values: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, deltas: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 deltas with ``cast(base + delta) == values`` exactly, for the selected weight ``name``.

    Given ``deltas`` are checked and returned; otherwise ``values - base`` is nudged by fp32 ulps where the sum
    does not round back to the value (fp32 weights can need that; bf16 and fp16 weights never do).
    """
    values = values.reshape(-1).to(dtype)
    if values.numel() != base.numel():
        raise ValueError(f"{name!r} has {base.numel()} selected entries but {values.numel()} values were given")
    if deltas is not None:
        d = deltas.reshape(-1).to(torch.float32)
        if d.numel() != base.numel() or not torch.equal((base + d).to(dtype), values):
            raise ValueError(
                f"the stored deltas of {name!r} do not reproduce its stored values: the adapter is damaged"
            )
        return d.clone()
    target = values.to(torch.float32)
    d = target - base
    for _ in range(64):
        got = (base + d).to(dtype)
        bad = got != values
        if not bool(bad.any()):
            return d
        direction = torch.where(got[bad].to(torch.float32) < target[bad], math.inf, -math.inf)
        d[bad] = torch.nextafter(d[bad], direction.to(torch.float32))
    raise ValueError(
        f"could not reconstruct fp32 deltas of {name!r} that reproduce the stored values exactly; save "
        f"the adapter with save_deltas=True"
    )


def _checked_metrics(metrics: Any) -> dict[str, Any]:
    """``metrics`` as the adapter config stores it (strict JSON): name -> finite number, string or bool."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (str, bool)) or v is None:
            out[str(k)] = v
        elif isinstance(v, numbers.Real) and math.isfinite(float(v)):
            out[str(k)] = int(v) if isinstance(v, numbers.Integral) else float(v)
        elif isinstance(v, numbers.Real):
            raise ValueError(f"metrics[{k!r}] is {v}: the adapter config is strict JSON; drop the entry or store None")
        else:
            raise TypeError(
                f"metrics[{k!r}] is a {type(v).__name__}; metrics hold numbers, strings, booleans or None "
                f"(strict JSON): pass float(value)"
            )
    return out


def _stored(deltas: torch.Tensor | None) -> torch.Tensor:
    """A legacy adapter's deltas (it stored deltas, not values, so they are always there)."""
    if deltas is None:
        raise ValueError("the adapter stores neither values nor deltas for a tensor: it is damaged")
    return deltas


def _version() -> str:
    return gallop_kernels.__version__


def _resolve_adapter_path(path_or_id, revision: str | None):
    """A local folder as is; anything else is taken for a Hub repo id and fetched (cached) by huggingface_hub."""
    from pathlib import Path

    if Path(path_or_id).exists() or revision is None and not isinstance(path_or_id, str):
        return Path(path_or_id)
    if isinstance(path_or_id, str) and path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:  # pragma: no cover - transformers depends on it
            raise FileNotFoundError(
                f"{path_or_id!r} is not a folder, and huggingface_hub is not installed to fetch it from the Hub"
            ) from None
        try:
            return Path(snapshot_download(path_or_id, revision=revision))
        except Exception as e:  # offline, no such repo, no access: one clear error
            raise FileNotFoundError(
                f"{path_or_id!r} is not a local folder and could not be fetched from the Hub ({type(e).__name__}: {e})"
            ) from None
    return Path(path_or_id)
