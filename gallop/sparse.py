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
* **Write-back**, two entry points: ``_write_back`` after any torch optimizer's step (a global step post-hook,
  unconditionally for every delta that optimizer holds: a fused torch optimizer moves no version counter) and,
  through the deltas' version counters, before a forward or a state dict (an in-place edit of a delta); and
  ``merge`` / ``unmerge``. Both write through ``_scatter`` (one ``scatter_grouped_`` call for every weight);
  non-finite deltas are refused.

Adapter persistence (``save_pretrained``, ``from_pretrained``, ``load_adapter_``) is ``gallop.adapters.io``'s.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import gallop_kernels

from . import layers, quantized
from .adapters import io
from .adapters.format import AdapterTensor
from .adapters.io import deltas_for_values
from .checkpointing import inputs_require_grad
from .selection import (
    Selection,
    check_fits,
    check_same_selection_on_all_ranks,
    dense_weight,
    quantized_owners,
    selection_fingerprint,
)

__all__ = ["SparseModel", "deltas_for_values", "selection_fingerprint"]
logger = logging.getLogger(__name__)


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
        sparse._write_back(ids, deltas_finite=finite)


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
        if isinstance(model, SparseModel):
            raise ValueError(
                "model is already a SparseModel; wrap the plain model (sparse.model), or call merge_and_unload() first"
            )
        names, params, indices = check_fits(model, selection)  # raises before anything changes, as all below
        if any(layers.is_installed(m) for m in model.modules()):
            raise ValueError(
                "this model is already wrapped by a SparseModel (its modules carry gallop deltas): call "
                "merge_and_unload() on that wrapper first, or keep using it"
            )
        owners = layers.owning_modules(model, names, params)
        deltas = layers.delta_tree(names)  # built first: a name that cannot be a module path fails before any change
        device = params[names[0]].device
        fingerprint = selection_fingerprint(names, indices)
        check_same_selection_on_all_ranks(fingerprint, sum(int(i.numel()) for i in indices), device, process_group)

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
        self._guarded = layers.guard_containers(model)
        if any(t.quantized for t in self._targets):
            # transformers' Trainer refuses a quantized model unless trainable adapters are attached, which they are
            self._hf_peft_config_loaded = True
        self._install_hooks()
        self.__class__ = _wrapper_class(type(model))  # type: ignore[arg-type]

    def _attach_targets(self, names, params, indices, owners, device) -> list[layers.SelectedWeight]:
        """One flat fp32 base and one flat fp32 delta storage; per weight, its slices registered as the delta
        parameter (here and on its owning modules) and the module's buffers, and the module's sparse forward."""
        k = sum(int(i.numel()) for i in indices)
        flat_base = torch.empty(k, dtype=torch.float32, device=device)
        flat_delta = torch.zeros(k, dtype=torch.float32, device=device)
        targets = []
        offset = 0
        q_owners = quantized_owners(self._model)
        for name, idx in zip(names, indices):
            n = int(idx.numel())
            base = flat_base[offset : offset + n]
            dense = dense_weight(self._model, params[name], q_owners)  # a quantized layer's: a temporary
            gallop_kernels.gather(dense, idx, out=base, check_indices=False)
            delta = nn.Parameter(flat_delta[offset : offset + n])
            self.deltas.get_submodule(name.rpartition(".")[0]).register_parameter(name.rpartition(".")[2], delta)
            for m in owners[name]:
                layers.install(m, delta, idx, base)
            targets.append(layers.SelectedWeight(name, params[name], owners[name], delta))
            offset += n
        for t in targets:
            t.synced_version = t.delta._version
        return targets

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
        pairs = [(by_name[n], d) for n, d in deltas.items() if isinstance(d, torch.Tensor)]
        pairs = [
            (t, d.detach().reshape(-1).to(t.delta.device, torch.float32))
            for t, d in pairs
            if d.numel() == t.delta.numel()
        ]
        bad = layers.bad_writes([t for t, _ in pairs], [d for _, d in pairs])  # the wrong sizes are reported later
        if bad:
            raise ValueError(
                f"{argument} holds NaN or Inf for the delta of {bad[0]!r} (or base + delta overflows its "
                f"{by_name[bad[0]].weight.dtype} weight); nothing was loaded. Load a checkpoint saved before training "
                f"diverged"
            )

    def _after_load(self, module, incompatible_keys) -> None:
        self._write_back({id(t.delta) for t in self._targets})

    # ------------------------------------------------------------------------------------------ write-back
    @torch.compiler.disable  # eager bookkeeping: compiled graphs must not trace (and recompile on) the write loop
    def _pre_forward_hook(self, module, args) -> None:
        if not self._merged and torch.is_grad_enabled() and module.training:
            raise RuntimeError(
                "the SparseModel is unmerged (its weights hold the pretrained values), so training now "
                "would compute gradients at the wrong point: call merge() before training (unmerged "
                "evaluation under torch.no_grad() or model.eval() is fine)"
            )
        self._write_back()

    def _state_dict_hook(self, *args, **kwargs) -> None:
        self._write_back()

    def sync(self) -> None:
        """Write ``cast(base + delta)`` into the weights for every delta changed since its last write (if merged).

        Raises ``FloatingPointError`` (writing nothing) when a changed delta holds NaN or Inf.
        """
        self._write_back()

    def write_back(self) -> None:
        """Write ``cast(base + delta)`` into every selected weight now (if merged), as after an optimizer step."""
        self._check_live()
        self._write_back({id(t.delta) for t in self._targets})

    @torch.compiler.disable
    def _write_back(self, stepped: set[int] | None = None, deltas_finite: bool = False) -> None:
        """The write-back after a step: every delta whose id is in ``stepped`` (those the stepping optimizer holds;
        ``deltas_finite`` when it never takes a non-finite step), else every delta changed since its last write."""
        if self._unloaded or not self._merged:
            return
        if stepped is None:
            targets = [t for t in self._targets if t.delta._version != t.synced_version]
        else:
            targets = [t for t in self._targets if id(t.delta) in stepped]
        if targets:
            self._check_finite(targets, deltas_finite and stepped is not None)
            self._scatter(targets)

    def _check_finite(self, targets, deltas_finite: bool = False) -> None:
        """Raise ``FloatingPointError`` (writing nothing) for a non-finite delta, or a merged value that overflows an
        fp16 weight: the weights never receive NaN or Inf. One device sync."""
        bad = layers.bad_writes(targets, deltas_finite=deltas_finite)
        if bad:
            raise FloatingPointError(
                f"the deltas of {len(bad)} selected weights hold NaN or Inf, or overflow the weight's dtype (first: "
                f"{bad[0]!r}), so they were not written into the weights (which still hold the last finite values). "
                f"An optimizer stepped on a non-finite gradient or diverged: use gallop.SparseAdamW (it skips "
                f"non-finite steps) or lower the learning rate"
            )

    @torch.no_grad()
    def _scatter(self, targets: list[layers.SelectedWeight], merged: bool = True) -> None:
        """The write-back's kernel call, the only one: ``W[idx] = cast(base + delta)`` for every target (``merged``)
        or ``W[idx] = cast(base)``, in one ``scatter_grouped_`` (one launch per weight dtype on the GPU). A quantized
        target is skipped: its forward applies the delta, and the quantized storage is never written."""
        for t in targets:
            if t.quantized:
                t.synced_version = t.delta._version
        targets = [t for t in targets if not t.quantized]
        if not targets:
            return
        weights = [t.weight.detach() for t in targets]
        indices = [t.indices for t in targets]
        if not merged:
            bases = [t.base for t in targets]
            gallop_kernels.scatter_grouped_(weights, indices, bases, check_indices=False, nonfinite="assume_finite")
            return
        deltas, bases = [t.delta.detach() for t in targets], [t.base for t in targets]
        for t, delta, base in zip(targets, deltas, bases):
            if delta.dtype != torch.float32 or base.dtype != torch.float32:
                raise RuntimeError(
                    f"the delta or base of {t.name!r} was cast to {delta.dtype}/{base.dtype}; "
                    f"GaLLoP keeps them in fp32: cast the model before wrapping it"
                )
        gallop_kernels.scatter_grouped_(
            weights, indices, deltas, bases=bases, check_indices=False, nonfinite="assume_finite"
        )
        for t in targets:
            t.synced_version = t.delta._version

    def merge(self) -> nn.Module:
        """Make the weights hold ``cast(base + delta)`` (the default state); returns the model."""
        self._check_live()
        self._merged = True
        self._scatter(self._targets)
        return self._model

    def unmerge(self) -> nn.Module:
        """Restore the exact pretrained weights (bit-identical); the deltas are kept and ``merge()`` re-applies
        them. Training while unmerged raises; evaluation (``no_grad`` or eval mode) is fine."""
        self._check_live()
        if any(t.quantized for t in self._targets):
            raise NotImplementedError(
                "unmerge() is not available on a quantized base: its weights are never merged (each selected layer "
                "applies the delta in its forward); evaluate the base itself with a plain load of the model"
            )
        self._scatter(self._targets, merged=False)
        self._merged = False
        return self._model

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

    def merge_and_unload(self) -> nn.Module:
        """Merge the deltas, remove the delta state, the sparse forwards and the hooks, restore the
        ``requires_grad`` flags; returns the plain fine-tuned model. The wrapper cannot be used afterwards.

        On a quantized base, every bitsandbytes layer becomes an ``nn.Linear`` holding its de-quantized weight (in
        its de-quantized dtype: the compute dtype for nf4, fp32 for int8) with the deltas merged."""
        self._check_live()
        self.sync()
        if not self._merged:
            self.merge()
        merge_later = [(t.name, t.indices, t.delta.detach(), t.base) for t in self._targets if t.quantized]
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
        if merge_later:  # a quantized base: de-quantize, then merge the deltas into the dense weights
            quantized.dequantize_model(self._model)
            with torch.no_grad():
                for name, idx, delta, base in merge_later:
                    w = self._model.get_parameter(name)
                    gallop_kernels.scatter_(w.detach(), idx, delta, base=base, check_indices=False)
        self._unloaded = True
        _LIVE.discard(self)
        return self._model

    def _check_live(self) -> None:
        if self._unloaded:
            raise RuntimeError("this SparseModel was unloaded (merge_and_unload); wrap the model again to train it")

    def export_state(self) -> list[AdapterTensor]:
        """Per selected weight, on the CPU: name, shape, dtype, indices, merged values, fp32 deltas and base."""
        self._check_live()
        out = []
        for t in self._targets:
            base, delta, indices = (
                t.base.detach().cpu(),
                t.delta.detach().cpu().clone(),
                t.indices.to("cpu", torch.int64),
            )
            values = (base + delta).to(t.dtype)
            out.append(AdapterTensor(t.name, t.shape, t.dtype, indices, values, delta, base))
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
        self._write_back({id(t.delta) for t in self._targets})

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
            value, delta = values[t.name].to(t.base.device), None if d is None else d.to(t.base.device)
            out[t.name] = deltas_for_values(t.name, value, t.base, t.weight.dtype, delta)
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
        """Save the adapter to ``directory`` (PEFT's layout; see ``gallop.adapters.format``), atomically.

        The trained entries are stored in the weight's own dtype, so ``from_pretrained`` onto the pretrained model
        reproduces the trained weights bit for bit (2 bytes an entry for bf16, 4 for fp32, plus about 2 for the
        index). ``save_deltas=True`` also stores the fp32 deltas (4 bytes more an entry) to resume training
        exactly. ``precision`` is the 0.1 spelling (``"fp32"`` = ``save_deltas=True``, ``"bf16"`` = the default),
        removed in gallop 0.4. ``metrics`` (name -> number) go into the config and the model card. A NaN or Inf
        entry is refused.
        """
        self._check_live()
        save_deltas = io.save_deltas_for(precision, save_deltas)
        save_deltas = save_deltas or any(t.quantized for t in self._targets)  # a quantized base's adapter holds them
        stored_metrics = None if metrics is None else io.checked_metrics(metrics)  # refused before anything is written
        self.sync()
        states = self.export_state()
        io.save(directory, states, self.adapter_config(states), save_deltas=save_deltas, metrics=stored_metrics)

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
        io.push(
            lambda folder: self.save_pretrained(folder, save_deltas=save_deltas, metrics=metrics),
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            revision=revision,
        )

    def adapter_config(self, states: list[AdapterTensor] | None = None) -> dict:
        """The config an adapter of this SparseModel records (without the per-tensor part)."""
        return io.adapter_config(self._model, self.selection, self.export_state() if states is None else states)

    def load_adapter_(self, directory) -> None:
        """Load the trained entries of an adapter saved from a SparseModel with this same selection and base
        (e.g. a checkpoint, to resume): its fp32 deltas when stored, else deltas reproducing its values."""
        self._check_live()
        names, indices, bases = self.target_names, [t.indices for t in self._targets], [t.base for t in self._targets]
        self.load_deltas_(io.load_for(directory, self._model, names, indices, bases))

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
        selection, deltas = io.load(model, directory, revision)
        sparse = cls(model, selection, process_group=process_group)
        sparse.load_deltas_(deltas)
        return sparse
