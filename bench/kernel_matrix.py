"""Every Triton kernel variant we launch, compiled ahead of time for a GPU target: no GPU needed.

``variants()`` is the one list of (kernel, argument types, constexprs) that the launchers in gallop_kernels use;
``compile_variant`` turns one into a cubin for a ``GPUTarget``. The AOT test compiles all of them for sm_90, and
each kernel variant once for sm_80 (tests/kernels/test_aot_compile.py); ``bench/roofline.py`` reads the SASS of the
ones training runs.
Run in a process where TRITON_INTERPRET is off:
    TRITON_INTERPRET=0 python bench/kernel_matrix.py
Prints one line per target and exits non-zero on the first kernel that fails to compile.
"""

from __future__ import annotations

import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gallop_kernels.gather_scatter import triton as scatter  # noqa: E402
from gallop_kernels.select_topk import triton as tselect  # noqa: E402
from gallop_kernels.sparse_adamw import triton as adamw  # noqa: E402

TARGETS = {"sm90 (H100/H200)": GPUTarget("cuda", 90, 32), "sm80 (A100)": GPUTarget("cuda", 80, 32)}
# sm_90 (the device's) gets every dtype combination; sm_80 every kernel and constexpr variant once, for the common
# dtypes (the first of each list): the whole matrix twice cost three minutes of CI for no lowering path of its own
FULL_MATRIX = {"sm90 (H100/H200)": True, "sm80 (A100)": False}
_TY = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64"}


def compile_variant(kernel, target, types: dict, constexprs: dict, divisible_by_16: tuple[str, ...] = ()):
    """``kernel`` compiled for ``target`` with these argument types (``types[name]``, e.g. ``"*bf16"``).

    ``divisible_by_16`` names the arguments to specialize as the launcher does at run time when a pointer is
    16-byte aligned or an integer a multiple of 16 (what lets Triton vectorize loads); ``"*"`` means every pointer.
    """
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(kernel.arg_names)
        if name not in constexprs
        and (name in divisible_by_16 or ("*" in divisible_by_16 and signature[name].startswith("*")))
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target)


def _select_types(g="float32", w="bfloat16", out="int32"):
    return {
        "g_ptr": "*" + _TY[g],
        "w_ptr": "*" + _TY[w],
        "hist_ptr": "*i64",
        "n": "i64",
        "eps": "fp32",
        "tkey": "i64",
        "prefix": "i32",
        "n_blocks": "i32",
        "block_stride": "i32",
        "invalid_ptr": "*i32",
        "level": "i32",
        "mask_ptr": "*i32",
        "cand_pos_ptr": "*i64",
        "pos_ptr": "*i64",
        "counts_ptr": "*i32",
        "block_tensor_ptr": "*i32",
        "out_table_ptr": "*i64",
        "first_block_ptr": "*i64",
        "out_start_ptr": "*i64",
        "out_len_ptr": "*i64",
        "wide_ptr": "*i64",
        "total_blocks": "i64",
        "k": "i64",
        "first_block": "i64",
        "above_ptr": "*i32",
        "ties_ptr": "*i32",
        "cand_key_ptr": "*i32",
        "cand_count_ptr": "*i64",
        "capacity": "i64",
        "threshold": "i32",
        "out_ptr": "*" + _TY[out],
        "out_off_ptr": "*i64",
        "tie_off_ptr": "*i64",
        "ties_wanted": "i64",
    }


SELECT_DTYPES = (("float32", "bfloat16", "int32"), ("bfloat16", "float32", "int64"), ("float16", "float16", "int32"))
SELECT_LEVELS = {  # name -> (PREFIX_SHIFT, BIN_SHIFT, NBINS)
    "histogram_l1": (32, tselect.SHIFT1, tselect.NB1),
    "histogram_l2": (tselect.SHIFT1, tselect.SHIFT2, tselect.NB2),
    "histogram_l3": (tselect.SHIFT2, 0, tselect.NB3),
}
SCALARS = {
    "n": "i64",
    "decay": "fp32",
    "one_minus_beta1": "fp32",
    "beta2": "fp32",
    "one_minus_beta2": "fp32",
    "step_size": "fp32",
    "bc2_sqrt": "fp32",
    "eps": "fp32",
}


def select_variants(g="float32", w="bfloat16", out="int32", scorers=range(5)):
    """(name, kernel, types, constexprs) of every selection kernel for these dtypes and scorers."""
    types = _select_types(g, w, out)
    for scorer in scorers:
        for name, (prefix_shift, bin_shift, nbins) in SELECT_LEVELS.items():
            for even in (False, True):
                for approx in (False, True) if name == "histogram_l1" and scorer == 0 else (False,):
                    constexprs = dict(PREFIX_SHIFT=prefix_shift, BIN_SHIFT=bin_shift, NBINS=nbins, SCORER=scorer)
                    constexprs.update(EVEN=even, APPROX=approx, BLOCK=tselect.BLOCK)
                    tag = ("_even" if even else "") + ("_sampled" if approx else "")
                    yield name + tag, tselect._histogram_kernel, types, constexprs
        for dense in (False, True):
            for even in (False, True):
                constexprs = dict(SCORER=scorer, BLOCK=tselect.BLOCK, SHIFT=tselect.SHIFT1, DENSE=dense, EVEN=even)
                constexprs["EDGE_CHECK"] = True
                name = "collect" + ("_dense" if dense else "") + ("_even" if even else "")
                yield name, tselect._collect_kernel, types, constexprs
        yield "count", tselect._count_kernel, types, dict(SCORER=scorer, BLOCK=tselect.BLOCK)
        yield "compact_keys", tselect._compact_kernel, types, dict(SCORER=scorer, BLOCK=tselect.BLOCK)
    masks = dict(GROUP=tselect.GROUP, BLOCK=tselect.BLOCK)
    yield "set_bits", tselect._set_bits_kernel, types, dict(BLOCK=tselect.SET_BLOCK)
    yield "popcount", tselect._popcount_kernel, types, masks
    for wide in (0, 1):
        yield ("compact_wide" if wide else "compact"), tselect._compact_mask_kernel, types, dict(masks, WIDE=wide)


def adamw_variant():
    types = {"p_ptr": "*fp32", "g_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", **SCALARS}
    return "sparse_adamw", adamw._adamw_kernel, types, dict(BLOCK=adamw.BLOCK)


def weight_variants(wdtype="bfloat16", idx="int32"):
    """The fused step, gather and scatter kernels for one weight dtype and index dtype."""
    w, i = "*" + _TY[wdtype], "*" + _TY[idx]
    state = {"d_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "n_weight": "i64"}
    step_types = {"w_ptr": w, "wg_ptr": w, "idx_ptr": i, "base_ptr": w, **state, **SCALARS}
    yield "fused_step", adamw._adamw_step_kernel, step_types, dict(BLOCK=adamw.BLOCK)
    for acc in (False, True):
        types = {"src_ptr": w, "idx_ptr": i, "out_ptr": "*fp32", "n": "i64", "n_src": "i64"}
        name = "gather_acc" if acc else "gather"
        yield name, scatter._gather_kernel, types, dict(ACCUMULATE=acc, BLOCK=scatter.BLOCK)
    for has_base in (False, True):
        types = {"dst_ptr": w, "idx_ptr": i, "val_ptr": "*fp32", "base_ptr": w, "n": "i64", "n_dst": "i64"}
        name = "scatter_base" if has_base else "scatter"
        yield name, scatter._scatter_kernel, types, dict(HAS_BASE=has_base, BLOCK=scatter.BLOCK)


def grouped_scatter_variants(wdtype="bfloat16", idx="int32"):
    """The grouped write-back's kernel for one weight and index dtype: without bases, and with fp32 bases (the
    SparseModel's) or bases in the weight's dtype."""
    common = {"table_ptr": "*i64", "block_row_ptr": "*i32", "dst_like": "*" + _TY[wdtype], "idx_like": "*" + _TY[idx]}
    yield (
        "scatter_grouped",
        scatter._scatter_grouped_kernel,
        {**common, "base_like": "*fp32"},
        dict(HAS_BASE=False, BLOCK=scatter.BLOCK),
    )
    for base in dict.fromkeys(("float32", wdtype)):
        name = "scatter_grouped_base" + ("" if base == "float32" else "_" + _TY[base])
        types = {**common, "base_like": "*" + _TY[base]}
        yield name, scatter._scatter_grouped_kernel, types, dict(HAS_BASE=True, BLOCK=scatter.BLOCK)


WEIGHT_DTYPES = ("bfloat16", "float16", "float32")


def variants(full: bool = True):
    """Every variant the launchers can ask for; ``full=False``: each kernel and constexpr variant once, for the
    first dtypes of ``SELECT_DTYPES`` and ``WEIGHT_DTYPES`` (both index dtypes)."""
    for g, w, out in SELECT_DTYPES if full else SELECT_DTYPES[:1]:
        yield from select_variants(g, w, out)
    yield adamw_variant()
    for wdtype in WEIGHT_DTYPES if full else WEIGHT_DTYPES[:1]:
        for idx in ("int32", "int64"):
            yield from weight_variants(wdtype, idx)
            yield from grouped_scatter_variants(wdtype, idx)


def main() -> int:
    if not hasattr(tselect._histogram_kernel, "cache_key"):
        print("the kernels are interpreted here: run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    for name, target in TARGETS.items():
        n = 0
        for _, kernel, types, constexprs in variants(FULL_MATRIX[name]):
            compile_variant(kernel, target, types, constexprs)
            n += 1
        print(f"{name}: {n} kernel variants compiled to cubin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
