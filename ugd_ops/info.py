"""``python -m ugd_ops.info``: which kernels serve this installation, for which devices, dtypes
and head dims, with the torch and CUDA versions. The first thing to run when something is slow."""

from __future__ import annotations

import platform
import sys

import torch

import ugd_ops
from ugd_ops import _backend
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
    if not _backend.compiled:
        lines += ["", f"To compile the kernels, {_backend.BUILD_HINT}."]
    elif _backend.reference_fallbacks:
        lines += ["", "Operators served by the reference on CUDA have no CUDA kernel in this build: either it was "
                  "built without CUDA (rebuild on a machine with a CUDA toolkit), or this version of ugd_ops ships "
                  "none for them yet."]
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
