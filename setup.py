"""Build of ugd_ops._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Install (torch must already be installed; see README.md):

    pip install --no-build-isolation -e .

Switches (environment variables):
    UGD_BUILD_EXT=0        build nothing: ugd_ops then runs on its pure-PyTorch reference
    UGD_BUILD_CUDA=auto    auto (default): CUDA when torch has CUDA and nvcc is found;
                           1: CUDA or fail; 0: CPU kernels only
    UGD_CUDA_ARCHS="80;90" compute capabilities to compile for ("90a" enables Hopper-only instructions)
    MAX_JOBS=N             parallel compile jobs (read by torch's ninja build)
    CUDA_HOME              the CUDA toolkit root, when it cannot be found from nvcc
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[ugd_ops setup] {msg}", file=sys.stderr)


def _is_toolkit_root(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit root. `nvcc` on PATH may be a wrapper script (it is on our dev machines), so
    dirname(dirname(which nvcc)) -- torch's guess -- can be wrong: resolve links and ask nvcc itself."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # nvcc reports its own root as TOP in a dry run
            out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m:
                candidates.append(os.path.normpath(m.group(1)))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for c in candidates:
        if _is_toolkit_root(c):
            return os.path.normpath(c)
    return None


def cuda_arch_flags(archs: str) -> list[str]:
    flags = []
    for a in (x.strip() for x in archs.replace(",", ";").split(";")):
        if not a:
            continue
        if not re.fullmatch(r"\d{2,3}[af]?", a):
            raise SystemExit(f"UGD_CUDA_ARCHS: '{a}' is not a compute capability such as 80, 90 or 90a")
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    if not flags:
        raise SystemExit("UGD_CUDA_ARCHS is empty; give e.g. UGD_CUDA_ARCHS='80;90'")
    return flags


def ext_modules():
    if os.environ.get("UGD_BUILD_EXT", "1") == "0":
        _log("UGD_BUILD_EXT=0: building no extension; ugd_ops will run on its pure-PyTorch reference")
        return [], {}
    want_cuda = os.environ.get("UGD_BUILD_CUDA", "auto").lower()
    if want_cuda not in ("auto", "0", "1"):
        raise SystemExit(f"UGD_BUILD_CUDA must be auto, 0 or 1, got {want_cuda!r}")
    cuda_home = find_cuda_home() if want_cuda != "0" else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        raise SystemExit(
            "ugd_ops needs PyTorch installed before it is built: `pip install torch`, then "
            "`pip install --no-build-isolation -e .`"
        ) from e

    has_cuda_torch = torch.version.cuda is not None
    build_cuda = want_cuda != "0" and has_cuda_torch and cuda_home is not None
    if want_cuda == "1" and not build_cuda:
        raise SystemExit(
            "UGD_BUILD_CUDA=1 but "
            + ("this torch has no CUDA" if not has_cuda_torch else "no CUDA toolkit was found; set CUDA_HOME")
        )
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp-simd", "-Wall", "-Wno-unknown-pragmas"]
    link = []
    if sys.platform.startswith("linux"):
        # The CPU kernels split work with at::parallel_for, whose OpenMP pragmas are compiled into
        # *our* object files: without -fopenmp they are ignored and every kernel runs on one thread.
        # torch links libgomp itself, so this adds no new runtime.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    macros = [("UGD_PYTHON_MODULE", None)]
    if build_cuda:
        archs = os.environ.get("UGD_CUDA_ARCHS", "80;90")
        sources += sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))  # attention/ holds the attention kernels
        macros += [("UGD_WITH_CUDA", None), ("UGD_CUDA_ARCHS_STR", f'"{archs}"')]
        nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo", *cuda_arch_flags(archs)]
        _log(f"building CPU and CUDA kernels (CUDA_HOME={cuda_home}, archs {archs})")
        ext = CUDAExtension("ugd_ops._C", sources, define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        why = ("UGD_BUILD_CUDA=0" if want_cuda == "0" else
               "torch has no CUDA" if not has_cuda_torch else "no CUDA toolkit (nvcc) found; set CUDA_HOME")
        _log(f"building CPU kernels only ({why})")
        ext = CppExtension("ugd_ops._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)
    return [ext], {"build_ext": BuildExtension}


_exts, _cmdclass = ext_modules()

setup(
    packages=find_packages(include=["ugd_ops", "ugd_ops.*", "ugd", "ugd.*"]),
    ext_modules=_exts,
    cmdclass=_cmdclass,
)
