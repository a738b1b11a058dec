"""Which backend serves the ugd_ops operators.

``import ugd_ops._C`` loads the compiled library, whose C++ defines the operators and registers
its kernels (CPU always, CUDA when it was built with CUDA). When it cannot be loaded, or
``UGD_OPS_FORCE_REFERENCE=1`` is set, the same operators are defined here and served by the
pure-PyTorch reference (one warning says so). A device the compiled library has no kernel for
is served by the reference too, with a warning at first use of a hot operator.

Some operators have kernels written in PyTorch in every build (``PYTHON_IMPLS``: the chunked linear
cross-entropy of ``chunked_ce.py``); they are registered here as ``CompositeExplicitAutograd`` (every
device), whether the schemas came from the compiled library or from ``_schemas.py``.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import chunked_ce, reference
from ._schemas import HOT_OPS, SCHEMAS

BUILD_HINT = (
    "build the kernels with `pip install --no-build-isolation -e .` from the ugd source tree "
    "(see README.md; `python -m ugd_ops.info` shows what was compiled)"
)

_REFERENCE_IMPLS = {
    "partitioned_attention_fwd": reference.partitioned_attention_fwd,
    "partitioned_attention_bwd": reference.partitioned_attention_bwd,
    "detached_kl_fwd": reference.detached_kl_fwd,
    "row_intervals": reference.row_intervals,
    "dense_mask": reference.dense_mask,
}

# Operators whose kernels are PyTorch code in every build (CPU and CUDA alike); a fused CUDA kernel
# for them is future work.
PYTHON_IMPLS = {
    "linear_cross_entropy_fwd": chunked_ce.linear_cross_entropy_fwd,
    "linear_cross_entropy_bwd": chunked_ce.linear_cross_entropy_bwd,
}

compiled: bool = False
load_error: str | None = None
# (op name, dispatch key) pairs served by the reference although the library was compiled.
reference_fallbacks: list[tuple[str, str]] = []
_lib: torch.library.Library | None = None


def _reference_build_info() -> str:
    return '{"torch": "%s", "cpu": null, "cuda": null, "reference": true}' % torch.__version__


def _warn_once(op: str, key: str):
    impl = _REFERENCE_IMPLS[op]
    warned = []

    def wrapper(*args):
        if not warned:
            warned.append(True)
            warnings.warn(
                f"ugd_ops: this build of ugd_ops._C has no {key} kernel for {op}; running the slow pure-PyTorch "
                f"reference instead. `python -m ugd_ops.info` shows what was compiled; if the build lacked a CUDA "
                f"toolkit, {BUILD_HINT}.",
                RuntimeWarning,
                stacklevel=3,
            )
        return impl(*args)

    return wrapper


def _define_reference_library() -> None:
    global _lib
    _lib = torch.library.Library("ugd_ops", "DEF")
    for name, schema in SCHEMAS.items():
        _lib.define(name + schema)
    for name, impl in _REFERENCE_IMPLS.items():
        _lib.impl(name, impl, "CompositeExplicitAutograd")
    _lib.impl("build_info", _reference_build_info, "CompositeExplicitAutograd")


def _register_python_kernels() -> None:
    global _lib
    if _lib is None:
        _lib = torch.library.Library("ugd_ops", "IMPL")
    for name, impl in PYTHON_IMPLS.items():
        _lib.impl(name, impl, "CompositeExplicitAutograd")


# The CUDA kernels of partitioned attention are the internal operators ugd_ops::_cuda_attention_fwd/_bwd
# (same schemas, CUDA only, opt-in: see cuda_attention.py); the public operators' CUDA kernels route here.
ATTENTION_OPS = ("partitioned_attention_fwd", "partitioned_attention_bwd")


def _attention_router(name: str):
    """CUDA kernel of ``ugd_ops::<name>``: the compiled kernel when ``cuda_attention.serves`` the call,
    else the reference (one warning). ``ugd_ops.partitioned_attention`` sends the calls flex serves to
    flex before they reach the operator, so the reference here is the last resort."""
    from . import _checks, cuda_attention, flex, layout_memo
    from ._schemas import CPU_MAX_HEAD_DIM

    fwd = name == "partitioned_attention_fwd"
    kernel_op = cuda_attention.FWD_OP if fwd else cuda_attention.BWD_OP
    ref = _REFERENCE_IMPLS[name]
    warned = []

    def impl(*args):
        q, k, v = args[0:3] if fwd else args[1:4]
        reason = cuda_attention.unserved_reason(q, k, v, kernel_op)
        if reason is None:
            # The kernel clamps a broken layout (never out of bounds) but cannot report it: check the
            # values once per layout (one host sync per batch) so it raises as docs/spec.md section 3 says.
            _checks.check_attention_meta(q, k, v, *args[-5:-2], CPU_MAX_HEAD_DIM)
            layout_memo.check_layout(*args[-5:-2], q.shape[0], args[-2])  # [-2]: max_seqlen
            return getattr(torch.ops.ugd_ops, kernel_op)(*args)
        if not warned:
            warned.append(True)
            flex_reason = flex.unserved_reason(q, k, v)
            warnings.warn(
                f"ugd_ops: {name} on CUDA runs the slow pure-PyTorch reference (compiled CUDA kernel: {reason}; "
                f"FlexAttention: {flex_reason or 'serves only calls through ugd_ops.partitioned_attention'}). "
                "`python -m ugd_ops.info` shows which path serves which case.",
                RuntimeWarning,
                stacklevel=3,
            )
        return ref(*args)

    return impl


def _fill_missing_cuda_kernels() -> None:
    global _lib
    for name in _REFERENCE_IMPLS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ugd_ops::{name}", "CUDA"):
            if _lib is None:
                _lib = torch.library.Library("ugd_ops", "IMPL")
            if name in ATTENTION_OPS:
                impl = _attention_router(name)
            else:
                impl = _warn_once(name, "CUDA") if name in HOT_OPS else _REFERENCE_IMPLS[name]
            _lib.impl(name, impl, "CUDA")
            reference_fallbacks.append((name, "CUDA"))


def load() -> None:
    global compiled, load_error
    if os.environ.get("UGD_OPS_FORCE_REFERENCE", "0") not in ("", "0"):
        load_error = "UGD_OPS_FORCE_REFERENCE is set"
    else:
        import importlib.util

        # Without a built library, ``from . import _C`` fails with Python's confusing "cannot import name
        # '_C' from partially initialized module ... (most likely due to a circular import)": say what it is.
        if importlib.util.find_spec(f"{__package__}._C") is None:
            load_error = (f"the compiled extension is not built (no _C*.so in "
                          f"{os.path.dirname(os.path.abspath(__file__))})")
        else:
            try:
                from . import _C  # noqa: F401  (loading the library registers the operators)

                compiled = True
            except ImportError as e:  # built, but for another torch or Python, or a library is missing
                load_error = f"the compiled extension ugd_ops._C could not be loaded ({type(e).__name__}: {e})"
    if compiled:
        _fill_missing_cuda_kernels()
        _register_python_kernels()
        return
    _define_reference_library()
    _register_python_kernels()
    if load_error != "UGD_OPS_FORCE_REFERENCE is set":
        warnings.warn(
            f"ugd_ops: {load_error}; every operator runs on the slow pure-PyTorch reference. To fix it, "
            f"{BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=2,
        )
