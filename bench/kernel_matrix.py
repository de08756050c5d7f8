"""Compile every Triton kernel ahead of time to cubin for the GPU targets we support; no GPU needed.

Run in a process where TRITON_INTERPRET is off (tests/kernels/test_aot_compile.py does that):
    TRITON_INTERPRET=0 python tests/kernels/aot_compile_matrix.py
Prints one line per target and exits non-zero on the first kernel that fails to compile.
"""

import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gallop_kernels.adamw import triton as adamw  # noqa: E402
from gallop_kernels.gather_scatter import triton as scatter  # noqa: E402
from gallop_kernels.topk_select import triton as tselect  # noqa: E402

TARGETS = {"sm90 (H100/H200)": GPUTarget("cuda", 90, 32), "sm80 (A100)": GPUTarget("cuda", 80, 32)}
_TY = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64"}


def _compile(kernel, target, types: dict, constexprs: dict):
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)


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
        "b1": "i32",
        "first_block": "i64",
        "above_ptr": "*i32",
        "ties_ptr": "*i32",
        "cand_key_ptr": "*i32",
        "cand_block_ptr": "*i64",
        "cand_count_ptr": "*i64",
        "threshold": "i32",
        "out_ptr": "*" + _TY[out],
        "out_off_ptr": "*i64",
        "tie_off_ptr": "*i64",
        "ties_wanted": "i64",
    }


def select_kernels(target) -> int:
    count = 0
    levels = (
        (32, tselect.SHIFT1, tselect.NB1),
        (tselect.SHIFT1, tselect.SHIFT2, tselect.NB2),
        (tselect.SHIFT2, 0, tselect.NB3),
    )
    dtypes = (("float32", "bfloat16", "int32"), ("bfloat16", "float32", "int64"), ("float16", "float16", "int32"))
    for g, w, out in dtypes:
        types = _select_types(g, w, out)
        for scorer in range(5):
            for prefix_shift, bin_shift, nbins in levels:
                _compile(
                    tselect._histogram_kernel,
                    target,
                    types,
                    dict(
                        PREFIX_SHIFT=prefix_shift, BIN_SHIFT=bin_shift, NBINS=nbins, SCORER=scorer, BLOCK=tselect.BLOCK
                    ),
                )
                count += 1
            for kernel in (tselect._collect_kernel, tselect._count_kernel, tselect._compact_kernel):
                extra = {"SHIFT": tselect.SHIFT1} if kernel is tselect._collect_kernel else {}
                _compile(kernel, target, types, dict(SCORER=scorer, BLOCK=tselect.BLOCK, **extra))
                count += 1
    return count


def optimizer_and_scatter_kernels(target) -> int:
    count = 0
    scalars = {
        "n": "i64",
        "decay": "fp32",
        "one_minus_beta1": "fp32",
        "beta2": "fp32",
        "one_minus_beta2": "fp32",
        "step_size": "fp32",
        "bc2_sqrt": "fp32",
        "eps": "fp32",
    }
    _compile(
        adamw._adamw_kernel,
        target,
        {"p_ptr": "*fp32", "g_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", **scalars},
        dict(BLOCK=adamw.BLOCK),
    )
    count += 1
    for wdtype in ("bfloat16", "float16", "float32"):
        for idx in ("int32", "int64"):
            w, i = "*" + _TY[wdtype], "*" + _TY[idx]
            step_types = {
                "w_ptr": w,
                "wg_ptr": w,
                "idx_ptr": i,
                "base_ptr": w,
                "d_ptr": "*fp32",
                "m_ptr": "*fp32",
                "v_ptr": "*fp32",
                "n_weight": "i64",
                **scalars,
            }
            _compile(adamw._adamw_step_kernel, target, step_types, dict(BLOCK=adamw.BLOCK))
            for acc in (False, True):
                _compile(
                    scatter._gather_kernel,
                    target,
                    {"src_ptr": w, "idx_ptr": i, "out_ptr": "*fp32", "n": "i64", "n_src": "i64"},
                    dict(ACCUMULATE=acc, BLOCK=scatter.BLOCK),
                )
            for has_base in (False, True):
                _compile(
                    scatter._scatter_kernel,
                    target,
                    {"dst_ptr": w, "idx_ptr": i, "val_ptr": "*fp32", "base_ptr": w, "n": "i64", "n_dst": "i64"},
                    dict(HAS_BASE=has_base, BLOCK=scatter.BLOCK),
                )
            count += 5
    return count


def main() -> int:
    if not hasattr(tselect._histogram_kernel, "cache_key"):
        print("the kernels are interpreted here: run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    for name, target in TARGETS.items():
        n = select_kernels(target) + optimizer_and_scatter_kernels(target)
        print(f"{name}: {n} kernel variants compiled to cubin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
