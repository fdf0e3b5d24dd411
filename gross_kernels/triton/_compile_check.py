"""Compile every Triton kernel for a CUDA target without a GPU, catching what the interpreter accepts but the compiler rejects.

    TRITON_INTERPRET=0 python -m gross_kernels.triton._compile_check [--arch 90] [--dtypes fp32,bf16]

Each kernel is compiled (to cubin, with Triton's bundled ptxas) in its smallest autotune config
and both values of its structural switches; nothing runs. Prints one line per kernel variant.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _smallest(configs):
    return min(configs, key=lambda c: (c.num_warps, sorted(c.kwargs.values())))


def _signature(fn, constexprs, dtype):
    """Triton signature: pointers for tensors (float32 for the weight-grad partials), i32 otherwise."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "part_ptr":
            signature[name] = "*fp32"
        elif name.endswith("_ptr") or (name[0] in "wd" and name[1:].isdigit()):
            signature[name] = "*" + dtype
        else:
            signature[name] = "i32"
    return signature


def compile_kernel(kernel, constexprs, dtype, arch, num_warps=4, num_stages=2):
    """Compile `kernel` (a JIT function, possibly wrapped by autotune) for sm_`arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    source = ASTSource(fn=fn, signature=_signature(fn, constexprs, dtype),
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def variants(dtypes):
    """(label, kernel, constexprs, dtype, config) for every kernel variant worth compiling."""
    from . import bottleneck, series

    gemm = _smallest(series._gemm_configs())
    wgrad = _smallest(series._wgrad_configs())
    fused = _smallest(bottleneck._fused_configs())
    for dtype in dtypes:
        prec = "tf32" if dtype == "fp32" else "ieee"
        for flat in (True, False):
            yield ("forward", series._forward_kernel,
                   dict(KH=3, KW=3, FLAT=flat, HAS_BIAS=not flat, PREC=prec, **gemm.kwargs),
                   dtype, gemm)
            yield ("backward_input", series._backward_input_kernel,
                   dict(KH=3, KW=3, FLAT=flat, PREC=prec, **gemm.kwargs), dtype, gemm)
        yield ("backward_weight", series._backward_weight_kernel,
               dict(KH=3, KW=3, PREC=prec, **wgrad.kwargs), dtype, wgrad)
        yield ("gather", series._gather_kernel, dict(KK=9, BLOCK=256), dtype, None)
        yield ("fused_forward", bottleneck._fused_forward_kernel,
               dict(KH=3, KW=3, HAS_BIAS=True, PREC=prec, TP=32, **fused.kwargs),
               dtype, fused)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, fp16, bf16")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 turns the kernels into interpreted functions; unset it")
    failures = 0
    for label, kernel, constexprs, dtype, config in variants(args.dtypes.split(",")):
        start = time.time()
        try:
            extra = ({"num_warps": config.num_warps, "num_stages": config.num_stages}
                     if config is not None else {})
            compiled = compile_kernel(kernel, constexprs, dtype, args.arch, **extra)
            status = f"ok, {compiled.metadata.shared} B shared"
        except Exception as error:  # reported per variant; the exit code says whether any failed
            failures += 1
            status = f"FAILED: {type(error).__name__}: {error}"
        flat = constexprs.get("FLAT")
        print(f"{label}{'' if flat is None else f' FLAT={flat}'} {dtype} sm_{args.arch}: "
              f"{status} ({time.time() - start:.0f} s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
