"""Which weights are eligible, the Selection (parameter name -> sorted flat indices of the trainable entries), and
the GradientCandidates a calibration in slices hands to ``select``."""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

import gallop_kernels

from . import layers, quantized
from .config import GallopConfig, ModulePattern


def _is_default_target(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or layers.is_conv1d(module) or quantized.is_quantized_linear(module)


def _matches(name: str, pattern: ModulePattern) -> bool:
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == s or name.endswith("." + s) for s in pattern)


def eligible_parameters(model: nn.Module, config: GallopConfig | None = None) -> OrderedDict[str, nn.Parameter]:
    """The weights GaLLoP may select from, in ``model.named_parameters()`` order (shared weights once).

    Default: the ``weight`` of every ``nn.Linear`` (and transformers ``Conv1D``) except the output head
    (``model.get_output_embeddings()``, and anything tied to it). With ``config.target_modules``: the ``weight``
    of every module whose name matches (suffix list or regex), whatever its type. ``exclude_modules`` removes.
    """
    config = config or GallopConfig()
    quantized.quantization_of(model)  # refuses an unsupported quantization before any work
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_weight = getattr(head, "weight", None) if head is not None else None
    wanted: set[int] = set()
    for mname, module in model.named_modules():
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if not isinstance(w, torch.Tensor) or not (w.dtype.is_floating_point or quantized.is_quantized_linear(module)):
            continue
        if config.target_modules is None:
            if not _is_default_target(module) or module is head or w is head_weight:
                continue
        elif not _matches(mname, config.target_modules):
            continue
        if config.exclude_modules is not None and _matches(mname, config.exclude_modules):
            continue
        wanted.add(id(w))
    out: OrderedDict[str, nn.Parameter] = OrderedDict()
    for pname, p in model.named_parameters():  # yields each shared parameter once, under its first name
        if id(p) in wanted:
            out[pname] = p
    if not out:
        raise ValueError(
            "no eligible weights: target_modules/exclude_modules matched no module with a floating weight "
            f"(target_modules={config.target_modules!r}, exclude_modules={config.exclude_modules!r}); "
            "check the module names with model.named_modules()"
        )
    return out


def quantized_owners(model: nn.Module) -> dict[int, nn.Module]:
    """id(weight) -> the bitsandbytes layer holding it, for every quantized linear layer of ``model``."""
    return {id(m.weight): m for m in model.modules() if quantized.is_quantized_linear(m)}


def weight_shape(model: nn.Module, param: torch.Tensor, owners: Mapping[int, nn.Module] | None = None) -> tuple:
    """The shape a weight stands for: its own, or ``[out, in]`` for a quantized layer's packed weight."""
    owners = quantized_owners(model) if owners is None else owners
    module = owners.get(id(param))
    return quantized.shape_of(module) if module is not None else tuple(param.shape)


def dense_weight(model: nn.Module, param: torch.Tensor, owners: Mapping[int, nn.Module] | None = None) -> torch.Tensor:
    """The weight as a dense tensor: itself (detached), or a quantized layer's de-quantized weight (a temporary)."""
    owners = quantized_owners(model) if owners is None else owners
    module = owners.get(id(param))
    return quantized.dequantized(module) if module is not None else param.detach()


_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The block number in a parameter name (``model.layers.3.mlp.up_proj.weight`` -> 3), or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_type_of(name: str) -> str:
    """The module's own name (``model.layers.3.mlp.up_proj.weight`` -> ``up_proj``)."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


class Selection(Mapping[str, torch.Tensor]):
    """The result of GaLLoP selection: parameter name -> sorted unique flat indices of its selected entries.

    Only tensors with at least one selected entry are keys; ``shapes`` holds every eligible tensor's shape.
    """

    def __init__(
        self, indices: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], config: GallopConfig
    ) -> None:
        self._indices = OrderedDict((n, i) for n, i in indices.items() if i.numel() > 0)
        self.shapes = OrderedDict((n, tuple(s)) for n, s in shapes.items())
        self.config = config
        unknown = [n for n in self._indices if n not in self.shapes]
        if unknown:
            raise ValueError(f"indices given for tensors without a shape: {unknown[:3]}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._indices[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)

    @property
    def num_selected(self) -> int:
        """k: the number of selected entries over all tensors."""
        return sum(int(i.numel()) for i in self._indices.values())

    @property
    def num_eligible(self) -> int:
        """The number of entries of all eligible tensors."""
        return sum(_numel(s) for s in self.shapes.values())

    @property
    def density(self) -> float:
        """Selected / eligible entries (the basis ``GallopConfig.density`` uses)."""
        return self.num_selected / max(1, self.num_eligible)

    def density_of_all(self, model: nn.Module) -> float:
        """Selected entries / all of the model's parameters (the basis some papers use, e.g. SpIEL)."""
        total = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(layers.DELTA))
        return self.num_selected / max(1, total)

    def to(self, device: str | torch.device) -> Selection:
        return Selection({n: i.to(device) for n, i in self._indices.items()}, self.shapes, self.config)

    def overlap(self, other: Selection) -> float:
        """|self ∩ other| / |self|: the fraction of this selection's entries that ``other`` also selects."""
        common = 0
        for name, idx in self._indices.items():
            if name in other:
                a, b = idx.long().cpu(), other[name].long().cpu()
                common += int(torch.isin(a, b, assume_unique=True).sum())
        return common / max(1, self.num_selected)

    def fraction_by(self, key: str = "module") -> OrderedDict[str, tuple[int, int]]:
        """Selected and eligible counts grouped by ``module`` type (q_proj, ...) or by ``layer`` number."""
        groups: OrderedDict[str, list[int]] = OrderedDict()
        for name, shape in self.shapes.items():
            if key == "module":
                g = module_type_of(name)
            elif key == "layer":
                layer = layer_of(name)
                g = "-" if layer is None else str(layer)
            else:
                raise ValueError(f"key must be 'module' or 'layer', got {key!r}")
            sel = int(self._indices[name].numel()) if name in self._indices else 0
            acc = groups.setdefault(g, [0, 0])
            acc[0] += sel
            acc[1] += _numel(shape)
        return OrderedDict((g, (s, e)) for g, (s, e) in groups.items())

    def __repr__(self) -> str:
        return (
            f"Selection(scorer={self.config.scorer!r}, budget={self.config.budget!r}, "
            f"{self.num_selected:,} of {self.num_eligible:,} entries ({100 * self.density:.3f}%) "
            f"in {len(self)} of {len(self.shapes)} tensors)"
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def selection_size(config: GallopConfig, numels: Sequence[int]) -> int:
    """k, the number of entries the global budget selects from tensors of ``numels`` elements:
    ``round(density * eligible)``, or ``num_selected``. Raises unless ``config`` selects at least one entry and no
    more than the tensors hold (with the ``per_tensor`` budget: at least one entry of the largest tensor)."""
    total = sum(numels)
    k = round(config.density * total) if config.num_selected is None else config.num_selected
    if k > total:
        raise ValueError(
            f"num_selected={k:,} is more than the {total:,} eligible entries of this model; ask for at most {total:,}"
        )
    if k < 1:
        raise ValueError(
            f"density={config.density} selects 0 of the {total:,} eligible entries; use density >= {1 / total:.3g}"
        )
    if config.budget == "per_tensor":
        largest = max(numels)
        if int(config.density * largest) == 0:
            raise ValueError(
                f"density={config.density} with budget='per_tensor' selects floor(density * numel) = 0 entries in "
                f"every tensor (the largest has {largest:,}); use density >= {1 / largest:.3g} or budget='global'"
            )
    return k


class GradientCandidates:
    """The mean gradient at the only entries a selection can still pick: what ``mean_gradients(..., slices=S)``
    returns, and ``select`` takes in place of the dense mean gradients.

    ``indices[name]``: sorted unique flat indices into the eligible weight ``name`` (int32 below ``2**31`` elements,
    else int64, as ``select`` gives them); ``values[name]``: the fp32 mean gradient at them. Together they hold the
    entries ``select`` would pick from the dense mean gradients with ``config``: with the global budget the top
    ``k`` of ``config.scorer`` over all eligible weights, with ``per_tensor`` each tensor's own top. So
    ``select(model, candidates, config)`` returns exactly that selection (same indices, same ties), and so does
    any config with the same scorer, eps, budget and eligible weights that asks for no more entries.

    ``slices``: the eligible weights' names, grouped as the passes over the calibration data accumulated them.
    """

    def __init__(
        self,
        indices: Mapping[str, torch.Tensor],
        values: Mapping[str, torch.Tensor],
        shapes: Mapping[str, tuple[int, ...]],
        config: GallopConfig,
        slices: Sequence[Sequence[str]],
    ) -> None:
        if list(indices) != list(shapes) or list(values) != list(shapes):
            raise ValueError("indices and values must name every eligible tensor of shapes, in its order")
        self.indices = OrderedDict(indices)
        self.values = OrderedDict(values)
        self.shapes = OrderedDict((n, tuple(s)) for n, s in shapes.items())
        self.config = config
        self.slices = [list(names) for names in slices]

    @property
    def num_candidates(self) -> int:
        """The number of candidate entries over all tensors (the config's k with the global budget)."""
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def nbytes(self) -> int:
        """The bytes the candidates' indices and values hold."""
        return sum(i.nbytes for i in self.indices.values()) + sum(v.nbytes for v in self.values.values())

    def __repr__(self) -> str:
        return (
            f"GradientCandidates(scorer={self.config.scorer!r}, budget={self.config.budget!r}, "
            f"{self.num_candidates:,} candidates in {len(self.shapes)} tensors, {len(self.slices)} slices)"
        )


def top_candidates(
    grads: Sequence[torch.Tensor],
    offered: Sequence[torch.Tensor],
    numels: Sequence[int],
    config: GallopConfig,
    k: int | None = None,
) -> list[torch.Tensor]:
    """The entries ``config``'s score selects among the entries offered of some eligible weights (in the eligible
    order), through ``gallop_kernels.select_topk``.

    ``offered[t]`` is eligible weight ``t`` (dense: de-quantized for a quantized layer, see ``dense_weight``) at the
    entries it offers: the whole weight (``grads[t]`` its dense mean gradient), or a 1-D tensor of its values at some
    sorted flat indices (``grads[t]`` the 1-D mean gradient there; ``offer`` builds it). ``numels[t]`` is the
    weight's element count. The global budget takes the top ``k`` of all offered entries, ``per_tensor`` each
    tensor's top ``floor(density * numels[t])`` (``k`` unused). Scores are those of ``select`` (the weights in their
    own dtype), and a tensor's offered entries keep their order, so ties go to the lower (tensor, flat index) as in
    ``select``: the result is exactly ``select``'s over the dense mean gradients whenever the offered entries
    contain it.

    Returns:
        per tensor, the sorted positions of its selected entries among those it offered (its flat indices, in
        ``select``'s index dtype, where it offered all of them). Extra memory: the positions (4 bytes each).
    """
    scorer, eps, seed = config.scorer, config.eps, config.seed
    if config.budget == "global":
        if k is None:
            raise ValueError("top_candidates needs k with the global budget")
        return gallop_kernels.select_topk(list(grads), list(offered), k, scorer=scorer, eps=eps, seed=seed)
    positions = []
    for g, w, numel in zip(grads, offered, numels):
        k_t = int(config.density * numel)
        if k_t == 0:
            positions.append(torch.empty(0, dtype=torch.int32, device=w.device))
        else:
            positions.append(gallop_kernels.select_topk([g], [w], k_t, scorer=scorer, eps=eps, seed=seed)[0])
    return positions


def offer(model: nn.Module, param: torch.Tensor, indices: torch.Tensor | None, owners: Mapping[int, nn.Module]):
    """``param``'s dense weight (``dense_weight``) whole, or its values at the flat ``indices`` (the de-quantized
    temporary of a quantized layer is freed as soon as they are taken)."""
    dense = dense_weight(model, param, owners)
    return dense if indices is None else torch.take(dense, indices.long())


def _check_candidates(
    candidates: GradientCandidates,
    names: list[str],
    shapes: list[tuple[int, ...]],
    devices: list[torch.device],
    config: GallopConfig,
    k: int,
) -> None:
    """Raise unless ``candidates`` hold the selection ``config`` makes over these eligible weights."""
    again = "calibrate again with this config: mean_gradients(model, batches, config, slices=S)"
    for attr in ("scorer", "eps", "budget"):
        made, asked = getattr(candidates.config, attr), getattr(config, attr)
        if made != asked:
            raise ValueError(
                f"grads holds the candidates of a calibration in slices made for {attr}={made!r}, but config has "
                f"{attr}={asked!r}; {again}"
            )
    if candidates.shapes != OrderedDict(zip(names, shapes)):
        raise ValueError(
            "grads holds the candidates of a calibration in slices over other eligible weights (another model, "
            f"or other target_modules / exclude_modules); {again}"
        )
    for n, device in zip(names, devices):
        if candidates.indices[n].device != device:
            raise ValueError(f"grads.indices[{n!r}] is on {candidates.indices[n].device} but the weight is on {device}")
    kept = candidates.num_candidates
    if config.budget == "global" and k > kept:
        raise ValueError(
            f"config selects {k:,} entries but the calibration in slices kept only the top {kept:,} (its own "
            f"config's): ask for at most {kept:,}, or {again}"
        )
    if config.budget == "per_tensor":
        for n, shape in zip(names, shapes):
            k_t, kept = int(config.density * _numel(shape)), int(candidates.indices[n].numel())
            if k_t > kept:
                raise ValueError(
                    f"config selects {k_t:,} entries of {n!r} but the calibration in slices kept only {kept:,} "
                    f"there: ask for density <= {candidates.config.density}, or {again}"
                )


def select(
    model: nn.Module,
    grads: Mapping[str, torch.Tensor] | GradientCandidates | None,
    config: GallopConfig | None = None,
) -> Selection:
    """Select the entries to fine-tune: the top ``density`` fraction of scores over the eligible weights.

    Args:
        model: the pretrained model (its weights are read, never written).
        grads: parameter name -> mean gradient (from ``mean_gradients``), shaped like the weight; or the
            ``GradientCandidates`` of ``mean_gradients(..., slices=S)``, which give the identical selection; may be
            ``None`` for the ``magnitude`` and ``random`` scorers.
        config: the GallopConfig (default: 1% with the GaLLoP score and a global budget).

    Returns:
        A Selection with exactly ``k = round(density * eligible)`` (or ``num_selected``) entries for the global
        budget; with the ``per_tensor`` budget every tensor gets ``floor(density * numel)`` (PEFT Supertuning's
        count).
    """
    config = config or GallopConfig()
    eligible = eligible_parameters(model, config)
    names = list(eligible)
    owners = quantized_owners(model)
    shapes = [weight_shape(model, eligible[n], owners) for n in names]
    numels = [_numel(shape) for shape in shapes]
    k = selection_size(config, numels)
    if isinstance(grads, GradientCandidates):
        _check_candidates(grads, names, shapes, [eligible[n].device for n in names], config, k)
        offered = [offer(model, eligible[n], grads.indices[n], owners) for n in names]  # one temporary at a time
        positions = top_candidates([grads.values[n] for n in names], offered, numels, config, k)
        idx = [grads.indices[n][at.long()] for n, at in zip(names, positions)]
        return Selection(OrderedDict(zip(names, idx)), OrderedDict(zip(names, shapes)), config)
    weights = [dense_weight(model, eligible[n], owners) for n in names]  # quantized: de-quantized temporaries
    g_list = None
    if config.uses_gradients:
        if grads is None:
            raise ValueError(
                f"grads is None but scorer {config.scorer!r} needs gradients: pass "
                f"mean_gradients(model, batches, config), or use scorer='magnitude' or 'random'"
            )
        missing = [n for n in names if n not in grads]
        if missing:
            raise ValueError(
                f"grads lacks {len(missing)} eligible weights, e.g. {missing[:3]}; compute them with "
                f"the same config: mean_gradients(model, batches, config)"
            )
        g_list = [grads[n] for n in names]
        for n, g, w in zip(names, g_list, weights):
            if tuple(g.shape) != tuple(w.shape):
                raise ValueError(f"grads[{n!r}] has shape {tuple(g.shape)} but the weight has {tuple(w.shape)}")
            if g.device != w.device:
                raise ValueError(f"grads[{n!r}] is on {g.device} but the weight is on {w.device}")
    if config.budget == "global":
        idx = gallop_kernels.select_topk(g_list, weights, k, scorer=config.scorer, eps=config.eps, seed=config.seed)
    else:
        idx = []
        for pos, w in enumerate(weights):
            k_t = int(config.density * w.numel())  # floor, as PEFT Supertuning counts: such selections export
            if k_t == 0:
                idx.append(torch.empty(0, dtype=torch.int32, device=w.device))
                continue
            g_t = None if g_list is None else [g_list[pos]]
            # a distinct random stream per tensor (each call sees its tensor at position 0)
            idx.append(
                gallop_kernels.select_topk(
                    g_t, [w], k_t, scorer=config.scorer, eps=config.eps, seed=config.seed * 1_000_003 + pos
                )[0]
            )
    return Selection(
        OrderedDict(zip(names, idx)), OrderedDict((n, tuple(w.shape)) for n, w in zip(names, weights)), config
    )


def check_fits(model: nn.Module, selection: Selection) -> tuple[list[str], dict[str, nn.Parameter], list[torch.Tensor]]:
    """Raise unless ``selection`` names floating, contiguous weights of ``model`` with its shapes, with sorted unique
    indices inside them, all on one device; returns (names, the model's parameters by name, indices per name)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be a gallop.Selection (from gallop.select), got {type(selection).__name__}")
    if selection.num_selected == 0:
        raise ValueError("selection is empty: nothing to train; select with a larger density")
    params = dict(model.named_parameters())
    owners = quantized_owners(model)
    if owners:
        quantized.quantization_of(model)
    names = list(selection)
    indices = []
    for name in names:
        if name not in params:
            raise ValueError(
                f"selection names {name!r}, which is not a parameter of this model: was it made for another model?"
            )
        p = params[name]
        shape = weight_shape(model, p, owners)
        if shape != tuple(selection.shapes[name]):
            raise ValueError(
                f"selection expects {name!r} of shape {tuple(selection.shapes[name])} but the model's is "
                f"{shape}: was it made for another model?"
            )
        if id(p) not in owners and not p.dtype.is_floating_point:
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; only floating weights can be trained")
        if not p.is_contiguous():
            raise ValueError(f"parameter {name!r} is not contiguous; call .contiguous() on it first")
        idx = selection[name]
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"selection[{name!r}] must be a 1-D int32/int64 tensor")
        numel = _numel(shape)
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


def selection_fingerprint(names: list[str], indices: list[torch.Tensor]) -> int:
    """A 56-bit fingerprint of (names, indices): equal selections give equal values on every rank and machine."""
    h = hashlib.sha256()
    for name, idx in zip(names, indices):
        h.update(name.encode())
        h.update(b"\0")
        h.update(idx.detach().to(torch.int64).cpu().numpy().tobytes())
        h.update(b"\1")
    return int.from_bytes(h.digest()[:7], "little")


def check_same_selection_on_all_ranks(fingerprint: int, k: int, device: torch.device, group) -> None:
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
