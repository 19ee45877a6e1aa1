"""Compile hf_adanorm's Triton kernels for NVIDIA GPUs without a GPU, for tests/test_triton.py.

    python tests/triton_aot.py REQUESTS_JSON      (with TRITON_INTERPRET unset or 0)

Each request names a kernel ('forward' / 'backward'), a target (sm_``arch``), the pointer
dtype, the constexpr flags and ``num_warps``; ``aligned`` marks pointers, strides and sizes
as multiples of 16, as Triton's launcher does for aligned tensors. Prints, per request, the
cubin size and the PTX's global loads and stores. Exit code 3: cannot compile here.
"""

import json
import sys

import triton
from triton.runtime.jit import JITFunction

try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401 - ships ptxas
except ImportError as err:
    print(f"Triton's NVIDIA backend is not available ({err})")
    sys.exit(3)

from hf_adanorm import triton_norm

KERNELS = {"forward": triton_norm._forward_kernel, "backward": triton_norm._backward_kernel}
FLOATS = ("eps", "k", "C")


def signature_of(fn: JITFunction, dtype: str, constexprs: dict) -> dict:
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in ("MEAN", "RSTD"):
            types[name] = "*fp32"  # row statistics are float32 whatever the input
        elif name in ("X", "Z", "G", "DX"):
            types[name] = f"*{dtype}"
        else:
            types[name] = "fp32" if name in FLOATS else ("i64" if "stride" in name else "i32")
    return types


def compile_one(request: dict) -> dict:
    fn = JITFunction(KERNELS[request["kernel"]].fn)
    constexprs = request["constexprs"]
    signature = signature_of(fn, request["dtype"], constexprs)
    aligned = request.get("aligned", False)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if aligned and signature[name] != "constexpr" and name not in (*FLOATS, "denominator")}
    source = triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", request["arch"], 32),
                              options={"num_warps": request["warps"]})
    accesses = [line.strip() for line in compiled.asm["ptx"].splitlines()
                if "ld.global" in line or "st.global" in line]
    return {"cubin_bytes": len(compiled.asm["cubin"]), "num_warps": compiled.metadata.num_warps,
            "global_accesses": accesses}


if __name__ == "__main__":
    print(json.dumps([compile_one(request) for request in json.loads(sys.argv[1])]))
