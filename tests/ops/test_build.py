"""The build and the backends: the compiled library matches the Python schemas, reports what it
holds, and without it ugd_ops still works on the reference after one warning that says what to do."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ugd_ops
from ugd_ops import _backend
from ugd_ops._schemas import SCHEMAS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def run_python(code: str, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=300)


def test_compiled_library_is_loaded():
    # `pip install -e .` must have built ugd_ops._C; CI runs the README install before the tests.
    if os.environ.get("UGD_OPS_FORCE_REFERENCE", "0") not in ("", "0"):
        pytest.skip("UGD_OPS_FORCE_REFERENCE is set")
    assert _backend.compiled, f"ugd_ops._C did not load: {_backend.load_error}"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schemas_match_python(name):
    schema = getattr(torch.ops.ugd_ops, name).default._schema
    assert str(schema) == f"ugd_ops::{name}{SCHEMAS[name]}"


@pytest.mark.parametrize("internal, public", [("_cuda_attention_fwd", "partitioned_attention_fwd"),
                                              ("_cuda_attention_bwd", "partitioned_attention_bwd")])
def test_internal_cuda_ops_have_the_public_schemas(internal, public):
    """The CUDA attention kernels' internal operators (defined only by CUDA builds, not in SCHEMAS)
    take exactly the public operators' arguments, so the router can pass a call on unchanged."""
    try:
        schema = getattr(torch.ops.ugd_ops, internal).default._schema
    except (AttributeError, RuntimeError):
        pytest.skip(f"this build does not define ugd_ops::{internal}")
    assert str(schema) == f"ugd_ops::{internal}{SCHEMAS[public]}"


def test_build_info():
    info = ugd_ops.build_info()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    if _backend.compiled:
        assert set(info["cpu"]["dtypes"]) == {"float32", "float64", "bfloat16", "float16"}
        assert "partitioned_attention_fwd" in info["cpu"]["ops"]
        if torch.version.cuda and info["cuda"] is not None:
            assert info["cuda"]["archs"]


def test_info_command():
    r = subprocess.run([sys.executable, "-m", "ugd_ops.info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "partitioned_attention_fwd" in r.stdout and "CPU" in r.stdout
    assert f"torch {torch.__version__}" in r.stdout


FALLBACK_CHECK = """
    import warnings, torch
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import ugd_ops
    from ugd_ops import _backend
    from ugd_ops.workloads import make_attention_inputs, random_spans
    x = make_attention_inputs(torch.tensor([[2, 2, 1, 1], [1, 2, 0, 1]], dtype=torch.int32), "ttm",
                              heads=(2, 1, 4), dtype=torch.float64, requires_grad=True)
    out = ugd_ops.partitioned_attention(*x.args())
    ref = ugd_ops.reference.partitioned_attention(*x.args())
    assert torch.allclose(out, ref)
    assert torch.autograd.gradcheck(lambda q: ugd_ops.partitioned_attention(q, *x.args()[1:]), (x.q,))
    loss = ugd_ops.detached_kl(torch.randn(4, 3, requires_grad=True), torch.randn(4, 3))
    loss.backward()
    torch.library.opcheck(torch.ops.ugd_ops.partitioned_attention_fwd.default, (*x.args(), None, 0.3))
    print("COMPILED", _backend.compiled)
    print("WARNINGS", len([m for m in w if "ugd_ops" in str(m.message)]))
    for m in w:
        print("MESSAGE", m.message)
"""


def test_reference_backend_when_the_library_is_missing():
    # Simulate an installation without the compiled library: `import ugd_ops._C` fails.
    code = "import sys; sys.modules['ugd_ops._C'] = None\n" + textwrap.dedent(FALLBACK_CHECK)
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "COMPILED False" in r.stdout
    assert "WARNINGS 1" in r.stdout  # exactly one warning ...
    assert "pip install --no-build-isolation -e ." in r.stdout  # ... that says how to build


def test_forced_reference_backend():
    r = run_python(FALLBACK_CHECK, UGD_OPS_FORCE_REFERENCE="1")
    assert r.returncode == 0, r.stderr
    assert "COMPILED False" in r.stdout and "WARNINGS 0" in r.stdout


def test_reference_build_info():
    r = run_python("import ugd_ops, json; print(json.dumps(ugd_ops.build_info()))", UGD_OPS_FORCE_REFERENCE="1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["reference"] is True


def test_setup_finds_the_real_cuda_root(tmp_path):
    """setup.py resolves CUDA_HOME through a wrapper-script nvcc (torch's own guess would not)."""
    real = tmp_path / "cuda-x"
    (real / "bin").mkdir(parents=True)
    (real / "include").mkdir()
    (real / "include" / "cuda_runtime.h").write_text("")
    nvcc = real / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={real}/bin/..' >&2\n")
    nvcc.chmod(0o755)
    wrapper_dir = tmp_path / "wrapper" / "bin"
    wrapper_dir.mkdir(parents=True)
    (wrapper_dir / "nvcc").write_text(f"#!/bin/sh\nexec {nvcc} \"$@\"\n")
    (wrapper_dir / "nvcc").chmod(0o755)
    code = (
        "import runpy, sys; sys.argv = ['setup.py', '--name'];"
        "import setuptools; setuptools.setup = lambda **kw: None;"
        "import os; os.environ['UGD_BUILD_EXT'] = '0';"
        "g = runpy.run_path('setup.py'); print('HOME', g['find_cuda_home']())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = f"{wrapper_dir}:/usr/bin:/bin"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"HOME {real}" in r.stdout
