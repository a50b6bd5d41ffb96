"""Lower every MaskedAdamW Triton kernel to TTIR for an sm_90 target, without a GPU (run as a subprocess).

The CPU interpreter (TRITON_INTERPRET=1) executes kernels as Python and so accepts code the GPU compiler rejects
(plain Python globals inside @triton.jit code, unsupported builtins, type errors the code generator finds).
Lowering to TTIR runs the real code generator front end on the CPU; run with TRITON_INTERPRET unset. Prints one
line per (kernel, variant) and exits non-zero on the first failure, with the compiler's message.
"""

from __future__ import annotations

import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run with TRITON_INTERPRET unset: the interpreter replaces @triton.jit functions")

from triton._C.libtriton import ir  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from mu_fast.kernels import masked_adamw as k32  # noqa: E402
from mu_fast.kernels import masked_adamw8bit as k8  # noqa: E402

TABLE = {"tiles_ptr": "*i64", "index_ptr": "*i32", "addr_ptr": "*i64"}
SCALAR = {"hyper_ptr": "*fp64", "group_ptr": "*i64", "step_ptr": "*fp64", "present_ptr": "*fp32", "n_slots": "i32",
          "partial_ptr": "*fp64", "n_partial": "i32", "coef_ptr": "*fp32", "control_ptr": "*fp32"}


def variants():
    """(module, kernel name, signature, constexprs) for every kernel over its constexpr switches and dtypes."""
    for like, tile in itertools.product(("*bf16", "*fp16", "*fp32"), (512, 4096)):
        for compact in (False, True):
            yield k32, "_grad_sumsq_kernel", {**TABLE, "cgrad_ptr": "*fp32", "like_ptr": like,
                                              "partial_ptr": "*fp64"}, {"TILE": tile, "COMPACT_GRAD": compact}
            yield k32, "_gather_grad_kernel", {"tiles_ptr": "*i64", "index_ptr": "*i32", "grad_ptr": like,
                                               "cgrad_ptr": "*fp32", "tile_begin": "i32"}, {"TILE": tile,
                                                                                           "ACCUMULATE": compact}
            for master in (False, True):
                yield k32, "_masked_adamw_kernel", {**TABLE, "cgrad_ptr": "*fp32", "like_ptr": like,
                                                    "m_ptr": "*fp32", "v_ptr": "*fp32", "master_ptr": "*fp32",
                                                    "coef_ptr": "*fp32"}, {
                    "TILE": tile, "COMPACT_GRAD": compact, "HAS_MASTER": master}
                yield k8, "_masked_adamw8bit_kernel", {
                    **TABLE, "cgrad_ptr": "*fp32", "like_ptr": like, "cm_ptr": "*u8", "cv_ptr": "*u8",
                    "am_ptr": "*fp32", "av_ptr": "*fp32", "qmap_m_ptr": "*fp32", "qmap_v_ptr": "*fp32",
                    "mids_m_ptr": "*fp32", "mids_v_ptr": "*fp32", "master_ptr": "*fp32", "coef_ptr": "*fp32"}, {"BLOCKS": tile // k8.QBLOCK, "COMPACT_GRAD": compact,
                                              "HAS_MASTER": master}
    for stats, finite in itertools.product((False, True), repeat=2):
        yield k32, "_adamw_scalars_kernel", SCALAR, {"HAS_STATS": stats, "CHECK_FINITE": finite,
                                                     "BLOCK": k32.SCALARS_BLOCK}


def kernels_in(module) -> set[str]:
    return {n for n, v in vars(module).items() if isinstance(v, JITFunction) and n.endswith("_kernel")
            and getattr(v, "__module__", module.__name__) == module.__name__}


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({})
    covered = set()
    for module, name, signature, constexprs in variants():
        fn = getattr(module, name)
        covered.add((module.__name__, name))
        sig = {**signature, **{k: "constexpr" for k in constexprs}}
        missing = [a for a in fn.arg_names if a not in sig]
        if missing:
            print(f"FAIL {name}: signature table lacks arguments {missing}")
            return 1
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        try:
            ASTSource(fn, sig, constexprs=constexprs).make_ir(target, options, backend.get_codegen_implementation(options),
                                                             backend.get_module_map(), context)
        except Exception as exc:  # noqa: BLE001 - report the compiler's message whatever its type
            print(f"FAIL {name} {constexprs} {signature.get('like_ptr', '')}: {type(exc).__name__}: {exc}")
            return 1
        print(f"ok {name} {constexprs} {signature.get('like_ptr', signature.get('grad_ptr', ''))}")
    for module in (k32, k8):
        for name in sorted(kernels_in(module) - {n for m, n in covered if m == module.__name__}):
            print(f"FAIL {module.__name__}.{name}: no TTIR variant listed in tests/optim/_ttir_lower.py")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
