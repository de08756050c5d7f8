"""Predict every kernel's H200 time from its own compiled code, without a GPU.

    TRITON_INTERPRET=0 PYTHONPATH=. python bench/roofline.py [--arch 90] [--json runs/roofline.json]

For each kernel variant training runs (``bench/kernel_matrix.py``) it compiles the cubin for ``GPUTarget("cuda",
arch, 32)``, disassembles it with the ``nvdisasm`` that Triton's wheel ships, and counts the SASS instructions of
the part that runs once per block of elements (a persistent kernel's loop body, else the whole kernel) by class:
ALU, warp collectives (vote, popc, shuffles, match), shared-memory loads/stores and atomics, global
loads/stores/atomics, branches and barriers. From those counts and the compiled ``num_warps``:

* warp instructions per element = counted instructions x warps per program / elements per block;
* global bytes per element, from the width of every global memory instruction (the cross-check of the model's
  bytes; a random 32-byte sector per selected entry is added where an op reads or writes scattered entries).

Then the time of each op at N = 2^30 (k = 1%) and at the LLaMA3-8B shapes is the largest of

* memory:  bytes / ``COPY_BPS`` (the H200's measured device copy rate, ../shared/baselines);
* issue:   warp instructions / (132 SMs x 4 schedulers x 1.98 GHz), one warp instruction per scheduler per clock;
* INT32:   integer ALU instructions at 64 lanes per SM per clock (half the issue rate: Hopper's INT32 pipe; ``IMAD``
  runs on the FMA pipe at full rate and is not counted here);
* SFU:     ``MUFU`` instructions at 16 lanes per SM per clock;
* shared atomics: ``ATOMS`` instructions at one per SM per clock (no bank conflicts: an optimistic bound);
* host:    Triton launches x ``LAUNCH_S`` + host syncs x ``SYNC_S``, counted by running the real launcher on tiny
  inputs through the interpreter (``_count_host_work``, in a child process) with one tensor and with 226;

(added to the device time when the op syncs between passes, overlapped otherwise), and the table prints which
bound binds and the ratio to torch's time measured on the H200 (../shared/baselines).
Every figure is a prediction: docs/performance.md records them beside what a device measures later.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The H200 (SXM, 132 SMs): measured copy rate from ../shared/baselines (4239 GB/s fp32 read+write), boost clock.
SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.98e9
COPY_BPS = 4.24e12
LAUNCH_S = 20e-6  # host time of one Triton launch from Python (the launcher, argument packing)
SYNC_S = 15e-6  # one host sync (.item(), .tolist(), nonzero) on an idle stream, round trip
TORCH_OP_S = 5e-6  # host time of one torch call that makes a new tensor on CUDA (dispatch + launch)
SECTOR = 32  # bytes: the DRAM/L2 access granularity a scattered entry costs
N30 = 1 << 30
SORT_S_PER_KEY = 2 * 46.6e-3 / N30  # torch.sort: 46.6 ms for 2^30 fp32 keys on the H200; int64 keys twice that
SORT_MIN_S = 30e-6  # a small sort's fixed cost (several CUB passes and launches)
# The selection's common path (bench/kernel_matrix.py names) and the share of k in the threshold bin: 0.065-0.093
# at 0.1-10% for |g|/|w| of normal and of LLM-like (heavy-tailed g, w ~ 0.02 N(0, 1) in bf16) data, measured on
# 2^22 samples (2026-12-03); the model takes 0.08.
SELECT_KERNELS = ("histogram_l1_even_sampled", "collect_even", "popcount", "set_bits", "compact")
CANDIDATES_PER_K = 0.08
TORCH_MS = {  # ../shared/baselines/README.md, H200, torch 2.11 (the same-run figures replace them on a device)
    "select_topk 2^30": 12.0 + 20.3,  # score + torch.topk(1%)
    "select_topk llama8b": 258.0,  # per-tensor score + topk: torch's global top-k crashes at 8B
    "fused_step 2^30": 1.02,  # sparse AdamW with torch index ops (gather, update, scatter)
    "scatter_ 2^30": 0.54,  # index_add_ bf16 on k
    "sparse_adamw_ 2^30": 8.77 / 100,  # torch's fused AdamW over 2^30 params (28 B each, as ours), scaled to k
}

CLASSES = (
    *("alu", "alu_int", "warp_collective", "shared", "shared_atomic"),
    *("global_load", "global_store", "global_atomic", "branch", "barrier", "sfu"),
)
_BRANCH = {"BRA", "BRX", "JMP", "JMX", "BSSY", "BSYNC", "BREAK", "CALL", "RET", "EXIT", "WARPSYNC", "BPT", "YIELD"}
_WARP = {"VOTE", "VOTEU", "POPC", "FLO", "SHFL", "MATCH", "REDUX", "UFLO", "UPOPC"}
_SHARED = {"LDS", "STS", "LDSM", "LDGSTS"}
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


_INT = ("IADD", "IMNMX", "IABS", "ISETP", "ISCADD", "LOP", "SHF", "SHL", "SHR", "LEA", "SEL", "PRMT", "BMSK",
        "BREV", "SGXT", "IDP", "I2I", "IMUL")  # fmt: skip


def classify(opcode: str) -> str:
    """The SASS opcode's class; ``alu_int`` is the part of the ALU work that runs on the INT32 pipe (half rate)."""
    if opcode.startswith(_INT) or opcode in ("UIADD3", "ULOP3", "USHF", "ULEA", "USEL", "UIMAD"):
        return "alu_int" if not opcode.startswith("U") else "alu"  # uniform-datapath ops issue but use no lanes
    if opcode in _BRANCH or opcode == "NOP":
        return "branch"
    if opcode in _WARP:
        return "warp_collective"
    if opcode == "ATOMS":
        return "shared_atomic"
    if opcode in _SHARED:
        return "shared"
    if opcode == "LDG":
        return "global_load"
    if opcode == "STG":
        return "global_store"
    if opcode in ("ATOMG", "RED", "ATOM"):
        return "global_atomic"
    if opcode in ("BAR", "MEMBAR", "DEPBAR", "ERRBAR", "CCTL"):
        return "barrier"
    if opcode == "MUFU":
        return "sfu"
    return "alu"


def _width(modifiers: str) -> int:
    """Bytes per lane of a memory instruction from its modifiers (``.E.128``, ``.U16``, ``.64``...)."""
    for token, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if token in modifiers:
            return size
    return 8 if ".F64" in modifiers or "64" in modifiers.split(".")[-1] else 4


@dataclass
class Sass:
    """A disassembled kernel: its instructions (address, opcode, modifiers, operands) and label addresses."""

    instructions: list[tuple[int, str, str, str]]
    labels: dict[str, int]

    @classmethod
    def parse(cls, text: str) -> Sass:
        instructions, labels, pending = [], {}, []
        for line in text.splitlines():
            m = _LABEL.match(line)
            if m:
                pending.append(m.group(1))
                continue
            m = _INSTR.search(line)
            if m:
                addr = int(m.group(1), 16)
                for name in pending:
                    labels[name] = addr
                pending = []
                instructions.append((addr, m.group(2), m.group(3), m.group(4)))
        return cls(instructions, labels)

    def loops(self) -> list[tuple[int, int]]:
        """(start, end) address ranges closed by a backward branch."""
        out = []
        for addr, op, _, operands in self.instructions:
            m = _TARGET.search(operands)
            # a branch to itself is the padding loop after EXIT, not a loop
            if op in ("BRA", "JMP") and m and self.labels.get(m.group(1), addr) < addr:
                out.append((self.labels[m.group(1)], addr))
        return out

    def main_body(self, persistent: bool = True) -> tuple[list[tuple[int, str, str, str]], bool, list]:
        """The instructions that run once per block. A persistent kernel (``persistent``): the loop holding the
        most global loads (its loop over blocks); else, or when no loop loads, the whole kernel. Returns
        (instructions, is_loop, the (start, end) ranges of the loops inside it)."""
        best, best_loads = None, 0
        for start, end in self.loops() if persistent else ():
            loads = sum(1 for a, op, _, _ in self.instructions if start <= a <= end and op == "LDG")
            if loads > best_loads or (loads == best_loads and best and end - start > best[1] - best[0]):
                best, best_loads = (start, end), loads
        if best is None:
            return self.instructions, False, self.loops()
        body = [i for i in self.instructions if best[0] <= i[0] <= best[1]]
        inner = [(s, e) for s, e in self.loops() if best[0] <= s and e <= best[1] and (s, e) != best]
        return body, True, inner


def counts(instructions, loops=(), trips: float = 1.0) -> Counter:
    """Instructions by class; those inside one of ``loops`` ((start, end) address ranges) count ``trips`` times
    (the loop's expected trip count: a data-dependent loop's static count would say once)."""
    out: Counter = Counter()
    for addr, op, _, _ in instructions:
        out[classify(op)] += trips if any(s <= addr <= e for s, e in loops) else 1
    return out


def global_bytes_per_lane(instructions) -> int:
    return sum(_width(mods) for _, op, mods, _ in instructions if classify(op).startswith("global"))


def _nvdisasm() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: this triton wheel does not ship nvdisasm")
    return str(path)


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_nvdisasm(), "-c", f.name], capture_output=True, text=True, check=True).stdout


@dataclass
class KernelCode:
    name: str
    num_warps: int
    block: int
    is_loop: bool
    inner_loops: int
    trips: float  # the expected trip count the inner loops were weighted by
    body: Counter
    rest: Counter  # instructions outside the per-block body (once per program)
    global_bytes_per_element: float
    total_instructions: int

    @property
    def warp_instructions_per_element(self) -> float:
        return sum(self.body.values()) * self.num_warps / self.block

    def per_element(self, cls: str) -> float:
        return self.body[cls] * self.num_warps / self.block


def analyse(name: str, kernel, types: dict, constexprs: dict, arch: int, trips: float = 1.0) -> KernelCode:
    """The SASS counts of one variant. Histogram kernels are persistent (the per-block part is their loop over
    blocks); every other kernel is one program per ``BLOCK`` (x ``GROUP``) elements, and the data-dependent loops
    inside it (the candidate and bit loops) are weighted by ``trips``."""
    from triton.backends.compiler import GPUTarget

    from bench.kernel_matrix import compile_variant

    # as the launcher specializes a training call: every pointer 16-byte aligned (separate torch allocations), and
    # the element count of a weight a multiple of 16 (the selection's n; the sparse ops' n = k may be anything)
    aligned = ("*", "n") if "hist_ptr" in types or "cand_key_ptr" in types else ("*",)
    compiled = compile_variant(kernel, GPUTarget("cuda", arch, 32), types, constexprs, aligned)
    sass = Sass.parse(disassemble(compiled.asm["cubin"]))
    body, is_loop, inner = sass.main_body(persistent=name.startswith("histogram"))
    body_addrs = {i[0] for i in body}
    rest = [i for i in sass.instructions if i[0] not in body_addrs]
    warps = compiled.metadata.num_warps
    block = constexprs["BLOCK"] * constexprs.get("GROUP", 1)
    return KernelCode(
        name=name,
        num_warps=warps,
        block=block,
        is_loop=is_loop,
        inner_loops=len(inner),
        trips=trips,
        body=counts(body, inner, trips),
        rest=counts(rest),
        global_bytes_per_element=global_bytes_per_lane(body) * 32 * warps / block,
        total_instructions=len(sass.instructions),
    )


# ------------------------------------------------------------------------------------------------ host work
_COUNT_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import gallop_kernels as gk
from gallop_kernels.select_topk import triton as tselect
from gallop_kernels.gather_scatter import triton as tscatter
from gallop_kernels.sparse_adamw import triton as tadamw

SYNCING = {"item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero", "repeat_interleave"}

class Count(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__(); self.syncs = 0; self.ops = 0
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING and not (name == "repeat_interleave" and "output_size" in (kwargs or {})):
            self.syncs += 1
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() > 0 and not out._is_view():  # ran a kernel, roughly
            self.ops += 1
        return out

launches = [0]
for module in (tselect, tscatter, tadamw):
    for attr in dir(module):
        kernel = getattr(module, attr)
        if attr.endswith("_kernel"):
            class Counted:
                def __init__(self, k): self.k = k
                def __getitem__(self, grid):
                    launches[0] += 1
                    return self.k[grid]
            setattr(module, attr, Counted(kernel))

def measure(fn):
    launches[0] = 0
    mode = Count()
    with mode:
        fn()
    return {"launches": launches[0], "syncs": mode.syncs, "torch_ops": mode.ops}

tselect.SAMPLE_MIN_BLOCKS = 1  # count the path a large call takes (level 1 from sampled blocks)
gen = torch.Generator().manual_seed(0)
out = {}
for tensors in (1, 226):
    ws = [torch.randn(64, generator=gen).to(torch.bfloat16) for _ in range(tensors)]
    gs = [torch.randn(64, generator=gen) for _ in range(tensors)]
    k = 64 * tensors // 2  # every tensor gets entries (so compacts), as at the real shapes
    out[f"select_topk x{tensors}"] = measure(lambda: gk.select_topk(gs, ws, k))
w, wg = torch.randn(4096).to(torch.bfloat16), torch.randn(4096).to(torch.bfloat16)
idx = torch.arange(0, 4096, 100)
base, d, m, v = w[idx].clone(), torch.zeros(idx.numel()), torch.zeros(idx.numel()), torch.zeros(idx.numel())
kw = dict(check_indices=False, nonfinite="assume_finite")
out["fused_step"] = measure(lambda: gk.sparse_adamw_step_(w, wg, idx, base, d, m, v, step=1, lr=1e-3, **kw))
out["fused_step checked"] = measure(lambda: gk.sparse_adamw_step_(w, wg, idx, base, d, m, v, step=1, lr=1e-3))
out["scatter_"] = measure(lambda: gk.scatter_(w, idx, d, base=base, **kw))
ws = [torch.randn(64).to(torch.bfloat16) for _ in range(226)]  # the write-back after a step, at 8B's tensor count
gi = [torch.arange(0, 64, 3) for _ in ws]
gb, gd = [x[i].float() for x, i in zip(ws, gi)], [torch.zeros(i.numel()) for i in gi]
out["scatter_grouped_ x226"] = measure(lambda: gk.scatter_grouped_(ws, gi, gd, bases=gb, **kw))
out["scatter_ x226"] = measure(lambda: [gk.scatter_(x, i, v, base=b, **kw) for x, i, v, b in zip(ws, gi, gd, gb)])
out["scatter_ checked"] = measure(lambda: gk.scatter_(w, idx, d, base=base))
out["sparse_adamw_"] = measure(lambda: gk.sparse_adamw_(d, d.clone(), m, v, step=1, lr=1e-3, nonfinite="assume_finite"))
out["sparse_adamw_ checked"] = measure(lambda: gk.sparse_adamw_(d, d.clone(), m, v, step=1, lr=1e-3))
print(json.dumps(out))
"""


def count_host_work() -> dict:
    """Launches and host syncs per call of each op, from the real launcher run through the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "GALLOP_BACKEND": "triton"}
    res = subprocess.run([sys.executable, "-c", _COUNT_SCRIPT, str(ROOT)], env=env, capture_output=True, text=True,
                         timeout=600, check=False)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"counting launches and syncs failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ predictions
@dataclass
class Pass:
    """One kernel launch pattern over ``elements`` (per block of ``code.block``) with ``bytes`` of traffic."""

    code: KernelCode
    elements: float
    bytes: float
    programs: float = 0.0  # persistent kernels: programs that run ``code.rest`` once each
    launches: int = 0  # the Triton launches this pass takes (one per tensor, or one)


def _device_bounds(passes: list[Pass]) -> dict[str, float]:
    warp_instr = sum(p.code.warp_instructions_per_element * p.elements for p in passes)
    warp_instr += sum(sum(p.code.rest.values()) * p.code.num_warps * p.programs for p in passes)
    atoms = sum(p.code.per_element("shared_atomic") * p.elements for p in passes)
    ints = sum(p.code.per_element("alu_int") * p.elements for p in passes)
    sfu = sum(p.code.per_element("sfu") * p.elements for p in passes)
    return {
        "memory": 1e3 * sum(p.bytes for p in passes) / COPY_BPS,
        "issue": 1e3 * warp_instr / (SMS * SCHEDULERS * CLOCK_HZ),
        "int32": 1e3 * ints * 32 / (SMS * 64 * CLOCK_HZ),
        "sfu": 1e3 * sfu * 32 / (SMS * 16 * CLOCK_HZ),
        "shared_atomics": 1e3 * atoms / (SMS * CLOCK_HZ),
    }


@dataclass
class Prediction:
    """An op's predicted time. The passes run in order; within a pass the host enqueues launches while the
    device runs the earlier ones, so a pass takes the larger of its device time and its host time (its launches;
    the launches not tied to a pass and the torch ops go with the last one); each host sync adds ``SYNC_S``, and
    ``torch_ms`` is device time spent in torch ops between passes (the candidate sort)."""

    op: str
    shape: str
    passes: list[Pass]
    launches: int
    syncs: int
    torch_ops: int = 0
    torch_ms: float = 0.0
    bounds_ms: dict[str, float] = field(default_factory=dict)
    ms: float = 0.0

    def compute(self) -> Prediction:
        untied = self.launches - sum(p.launches for p in self.passes)
        assert untied >= 0, "the passes claim more launches than the launcher makes"
        total, host_total = 0.0, 0.0
        for i, p in enumerate(self.passes):
            last = i == len(self.passes) - 1
            host = 1e3 * ((p.launches + untied * last) * LAUNCH_S + self.torch_ops * last * TORCH_OP_S)
            total += max(max(_device_bounds([p]).values()), host)
            host_total += host
        self.ms = total + 1e3 * self.syncs * SYNC_S + self.torch_ms
        self.bounds_ms = {**_device_bounds(self.passes), "host": host_total + 1e3 * self.syncs * SYNC_S}
        return self

    @property
    def binding(self) -> str:
        return max(self.bounds_ms, key=self.bounds_ms.get)  # type: ignore[arg-type]

    @property
    def read_bytes(self) -> float:
        return sum(p.bytes for p in self.passes)


def predict(codes: dict[str, KernelCode], host: dict) -> list[Prediction]:
    from bench.shapes import llama8b_shapes
    from gallop_kernels.select_topk.triton import BLOCK, SAMPLE_MIN_BLOCKS, SAMPLE_STRIDE

    h1, collect, popcount, set_bits, compact = (codes[n] for n in SELECT_KERNELS)
    programs = 4 * SMS
    rows = []
    for shape, sizes, host_key in (("2^30", [N30], "select_topk x1"), ("llama8b", None, "select_topk x226")):
        sizes = sizes or [a * b for a, b in llama8b_shapes()]
        tensors, n = len(sizes), float(sum(sizes))
        k = n / 100
        cand = CANDIDATES_PER_K * k  # keys in the threshold bin, buffered by the collect pass
        chosen = cand / 2
        pair = 6.0  # fp32 grad + bf16 weight per element
        blocks = n / BLOCK
        sampled = blocks >= SAMPLE_MIN_BLOCKS  # the large-call path: level 1 from every SAMPLE_STRIDE-th block
        read = n / SAMPLE_STRIDE if sampled else n
        passes = [
            Pass(h1, read, pair * read, min(programs, read / BLOCK / 16) * tensors, launches=tensors),
            # (g, w); the mask; above and invalid counts; the candidates (key, position) and their 2 re-read sectors
            Pass(collect, n, pair * n + n / 8 + 8 * blocks + cand * (12 + 2 * SECTOR), launches=tensors),
            Pass(set_bits, chosen, chosen * (8 + SECTOR), launches=1),
            Pass(popcount, n, n / 8 + 4 * blocks, launches=1),
            # the mask, out_off and the tensor of each block, the indices written
            Pass(compact, n, n / 8 + 12 * blocks + 4 * k, launches=1),
        ]
        sort_ms = 1e3 * max(SORT_MIN_S, cand * SORT_S_PER_KEY)
        rows.append(Prediction("select_topk", shape, passes, torch_ms=sort_ms, **host[host_key]).compute())
    k = N30 / 100  # the selected entries at 1%: about 100 elements apart, so each is its own 32-byte sector
    fused = codes["fused_step"]
    # idx 4, grad gather (a sector), base 2, delta/m/v read + write 24, weight read-modify-write (two sectors)
    rows.append(Prediction("fused_step", "2^30", [Pass(fused, k, k * (4 + SECTOR + 2 + 24 + 2 * SECTOR))],
                           **host["fused_step"]).compute())  # fmt: skip
    sc = codes["scatter_base"]
    rows.append(Prediction("scatter_", "2^30", [Pass(sc, k, k * (4 + 4 + 2 + 2 * SECTOR))],
                           **host["scatter_"]).compute())  # fmt: skip
    # the write-back after a step at the LLaMA3-8B shapes (k = 1%, fp32 bases as SparseModel keeps them): idx 4,
    # delta 4, base 4, the weight's read-modify-write (two sectors); the grouped kernel also reads its block's row
    # number (4 B a block; the table rows stay in L2). One launch for all tensors, against one per tensor.
    k8 = sum(a * b for a, b in llama8b_shapes()) / 100
    sector_bytes = k8 * (4 + 4 + 4 + 2 * SECTOR)
    gs = codes["scatter_grouped_base"]
    rows.append(Prediction("scatter_grouped_", "llama8b", [Pass(gs, k8, sector_bytes + 4 * k8 / gs.block, launches=1)],
                           **host["scatter_grouped_ x226"]).compute())  # fmt: skip
    rows.append(Prediction("scatter_ x226", "llama8b", [Pass(sc, k8, sector_bytes, launches=226)],
                           **host["scatter_ x226"]).compute())  # fmt: skip
    ad = codes["sparse_adamw"]
    rows.append(Prediction("sparse_adamw_", "2^30", [Pass(ad, k, 28 * k)], **host["sparse_adamw_"]).compute())
    return rows


def _expected_max_binomial(m: float, trials: int, p: float) -> float:
    """E[max of m independent Binomial(trials, p)] = sum over t >= 1 of P(max >= t)."""
    from math import comb

    cdf, total = 0.0, 0.0
    for t in range(trials):
        cdf += comb(trials, t) * p**t * (1 - p) ** (trials - t)
        total += 1 - min(cdf, 1.0) ** m
    return total


def loop_trips(density: float = 0.01) -> dict[str, float]:
    """Expected trips of the data-dependent loops at this selected density: the collect pass loops over its
    block's fullest word of candidates (``CANDIDATES_PER_K * density`` of the keys), the compaction over its
    program's fullest word of selected bits."""
    from gallop_kernels.select_topk.triton import BLOCK, GROUP

    words = BLOCK // 32
    return {
        "collect": _expected_max_binomial(words, 32, CANDIDATES_PER_K * density),
        "compact": _expected_max_binomial(GROUP * words, 32, density),
    }


def kernel_codes(arch: int) -> dict[str, KernelCode]:
    from bench.kernel_matrix import adamw_variant, grouped_scatter_variants, select_variants, weight_variants

    trips = loop_trips()
    variants = [v for v in select_variants("float32", "bfloat16", "int32", scorers=[0]) if v[0] in SELECT_KERNELS]
    variants += [v for v in weight_variants("bfloat16", "int32") if v[0] in ("fused_step", "scatter_base", "gather")]
    variants += [v for v in grouped_scatter_variants("bfloat16", "int32") if v[0] == "scatter_grouped_base"]
    variants.append(adamw_variant())
    # the collect pass as it runs on a block: without the rare exact-recompute branch (see _collect_kernel)
    variants = [(n, k, t, dict(c, EDGE_CHECK=False) if n.startswith("collect") else c) for n, k, t, c in variants]
    return {n: analyse(n, kernel, types, c, arch, trips.get(n.split("_")[0], 1.0)) for n, kernel, types, c in variants}


def report(codes: dict[str, KernelCode], rows: list[Prediction], arch: int) -> str:
    import triton

    lines = [f"triton {triton.__version__}, sm_{arch}: SASS per element of the part that runs once per block", ""]
    head = f"{'kernel':<14}{'warps':>6}{'block':>6}{'loop':>5}{'SASS':>6}{'warp-instr/elem':>17}"
    head += "".join(f"{c[:9]:>10}" for c in CLASSES) + f"{'B/elem':>8}"
    lines.append(head)
    for c in codes.values():
        row = f"{c.name:<14}{c.num_warps:>6}{c.block:>6}{'yes' if c.is_loop else 'no':>5}{c.total_instructions:>6}"
        row += f"{c.warp_instructions_per_element:>17.3f}" + "".join(f"{c.per_element(k):>10.3f}" for k in CLASSES)
        row += f"{c.global_bytes_per_element:>8.2f}"
        if c.inner_loops:
            row += f"  ({c.inner_loops} inner loop(s) weighted x{c.trips:g})"
        lines.append(row)
    lines += ["", f"predicted H200 time (copy {COPY_BPS / 1e12:.2f} TB/s, {SMS} SMs x {SCHEDULERS} x "
              f"{CLOCK_HZ / 1e9:.2f} GHz, launch {LAUNCH_S * 1e6:.0f} us, sync {SYNC_S * 1e6:.0f} us)", ""]  # fmt: skip
    columns = [("op", -17), ("shape", -9), ("memory", 9), ("issue", 9), ("int32", 9), ("sfu", 9), ("atomics", 9),
               ("host", 9), ("launch", 7), ("sync", 6), ("bound", 16), ("ms", 9), ("torch ms", 10), ("x torch", 9),
               ("of copy BW", 11)]  # fmt: skip
    lines.append("".join(f"{name:<{-w}}" if w < 0 else f"{name:>{w}}" for name, w in columns))
    for r in rows:
        b = r.bounds_ms
        torch_ms = TORCH_MS.get(f"{r.op} {r.shape}")
        ratio = f"{torch_ms / r.ms:9.1f}" if torch_ms else f"{'':>9}"
        copy_fraction = r.read_bytes / COPY_BPS * 1e3 / r.ms
        lines.append(
            f"{r.op:<17}{r.shape:<9}{b['memory']:>9.3f}{b['issue']:>9.3f}{b['int32']:>9.3f}{b['sfu']:>9.3f}"
            f"{b['shared_atomics']:>9.3f}{b['host']:>9.3f}"
            f"{r.launches:>7}{r.syncs:>6}{r.binding:>16}{r.ms:>9.3f}"
            + (f"{torch_ms:>10.2f}" if torch_ms else f"{'':>10}")
            + ratio
            + f"{100 * copy_fraction:>10.0f}%"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    p.add_argument("--json", default=None, help="also write the counts and predictions here")
    args = p.parse_args(argv)
    from gallop_kernels.select_topk import triton as tselect

    if not hasattr(tselect._histogram_kernel, "cache_key"):
        print("the kernels are interpreted in this process: run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    codes = kernel_codes(args.arch)
    rows = predict(codes, count_host_work())
    print(report(codes, rows, args.arch))
    if args.json:
        import triton

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "triton": triton.__version__,
            "arch": args.arch,
            "kernels": {n: {"num_warps": c.num_warps, "block": c.block, "loop": c.is_loop, "sass": c.total_instructions,
                            "per_element": {k: c.per_element(k) for k in CLASSES},
                            "global_bytes_per_element": c.global_bytes_per_element} for n, c in codes.items()},
            "predictions": [{"op": r.op, "shape": r.shape, "bounds_ms": r.bounds_ms, "ms": r.ms, "bound": r.binding,
                             "launches": r.launches, "syncs": r.syncs} for r in rows],
        }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
