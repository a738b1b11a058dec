"""``python -m ugd_ops.info``: which kernels serve this installation, for which devices, dtypes
and head dims, with the torch and CUDA versions. The first thing to run when something is slow."""

from __future__ import annotations

import platform
import sys

import torch

import ugd_ops
from ugd_ops import _backend, cuda_attention, flex
from ugd_ops._schemas import SCHEMAS


def kernel_table() -> list[tuple[str, str, str]]:
    """(operator, device, served by) for every tensor operator."""
    rows = []
    fallbacks = set(_backend.reference_fallbacks)
    for name in SCHEMAS:
        if name == "build_info":
            continue
        for key in ("CPU", "CUDA"):
            if name in _backend.PYTHON_IMPLS:
                how = "python (chunked PyTorch, every build)"
            elif key == "CUDA" and _backend.compiled and name in _backend.ATTENTION_OPS and (name, key) in fallbacks:
                how = "router: compiled CUDA kernel where it serves, else reference (see below)"
            elif not _backend.compiled:
                how = "reference (pure PyTorch)"
            elif (name, key) in fallbacks:
                how = "reference (pure PyTorch): no compiled kernel"
            elif torch._C._dispatch_has_kernel_for_dispatch_key(f"ugd_ops::{name}", key):
                how = "compiled"
            else:
                how = "none"
            rows.append((name, key, how))
    return rows


CASE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
CASE_HEAD_DIMS = (64, 128, 80)


def attention_cases() -> list[tuple[str, int, str, str]]:
    """(dtype, head dim, path, why not the faster paths) of ``partitioned_attention`` on CUDA: the
    compiled kernel, else FlexAttention, else the pure-PyTorch reference."""
    rows = []
    for dtype in CASE_DTYPES:
        for d in CASE_HEAD_DIMS:
            kernel = cuda_attention.case_reason(dtype, d)
            if kernel is None:
                rows.append((str(dtype).replace("torch.", ""), d, "compiled CUDA kernel", ""))
                continue
            fx = flex.case_reason(dtype, d)
            if fx is None:
                rows.append((str(dtype).replace("torch.", ""), d, "flex", f"kernel: {kernel}"))
            else:
                rows.append((str(dtype).replace("torch.", ""), d, "reference", f"kernel: {kernel}; flex: {fx}"))
    return rows


def attention_report() -> list[str]:
    switch = cuda_attention.switch()
    lines = [
        "partitioned attention on CUDA (ugd_ops.partitioned_attention, attn_implementation=\"ugd\"):",
        f"  compiled CUDA attention kernel: {'yes' if cuda_attention.compiled() else 'no'} "
        f"(fwd {cuda_attention.compiled(cuda_attention.FWD_OP)}, bwd {cuda_attention.compiled(cuda_attention.BWD_OP)});"
        f" {cuda_attention.ENV}={switch} -> {'on' if cuda_attention.enabled() else 'off'}"
        f"{'' if cuda_attention.VERIFIED else ' (unverified on a GPU: opt-in)'}",
        f"  FlexAttention: {'available' if flex.available() else 'unavailable: ' + str(flex._IMPORT_ERROR)}"
        f"{'; switched off (' + flex.ENV + '=0)' if flex.switched_off() else ''}",
        "  On the CPU the compiled C++ kernel serves every case (the reference where nothing was compiled).",
        "  dtype     head dim  path                  why not a faster one",
    ]
    for dtype, d, path, why in attention_cases():
        lines.append(f"  {dtype.ljust(9)} {str(d).ljust(9)} {path.ljust(21)} {why}")
    return lines


def report() -> str:
    info = ugd_ops.build_info()
    lines = [
        f"ugd_ops {ugd_ops.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (built with CUDA {torch.version.cuda})",
        f"library: {'compiled ugd_ops._C' if _backend.compiled else 'pure-PyTorch reference (' + str(_backend.load_error) + ')'}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cc = torch.cuda.get_device_capability(i)
            lines.append(f"cuda device {i}: {torch.cuda.get_device_name(i)} (sm_{cc[0]}{cc[1]})")
    else:
        lines.append("cuda devices: none visible")
    cpu = info.get("cpu")
    if cpu:
        lines.append(f"CPU kernels: dtypes {', '.join(cpu['dtypes'])}; head dims {cpu['head_dims']}")
        if "bf16_units" in cpu:  # builds before the bf16 path do not report it
            lines.append(f"CPU bf16 units: {cpu['bf16_units']}; bf16 attention products: {cpu['bf16_gemm']} "
                         "(UGD_CPU_BF16_GEMM=brgemm|avx512bf16|loop overrides)")
    cuda = info.get("cuda")
    if cuda:
        lines.append(f"CUDA kernels: CUDA {cuda['cuda_version']}, archs {cuda['archs']}; ops {', '.join(cuda['ops'])}"
                     + (f"; head dims {cuda['head_dims']}" if "head_dims" in cuda else ""))
    elif _backend.compiled:
        lines.append("CUDA kernels: not compiled (torch without CUDA, no nvcc, or UGD_BUILD_CUDA=0 at build time)")
    lines.append("")
    width = max(len(n) for n, _, _ in kernel_table())
    lines.append(f"{'operator'.ljust(width)}  device  served by")
    for name, key, how in kernel_table():
        lines.append(f"{name.ljust(width)}  {key.ljust(6)}  {how}")
    lines += [""] + attention_report()
    if not _backend.compiled:
        lines += ["", f"To compile the kernels, {_backend.BUILD_HINT}."]
    elif [n for n, _ in _backend.reference_fallbacks if n not in _backend.ATTENTION_OPS]:
        lines += ["", "Operators served by the reference on CUDA have no CUDA kernel in this build: either it was "
                  "built without CUDA (rebuild on a machine with a CUDA toolkit), or this version of ugd_ops ships "
                  "none for them yet."]
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
