"""Without a built extension, ``import ugd_ops`` says so plainly and how to build it.

A source tree that was never built has no ``ugd_ops/_C*.so``; Python's own message for the failing
``from . import _C`` ("cannot import name '_C' from partially initialized module ... circular import")
points the wrong way. The test copies the package without the library and imports it in a fresh
interpreter (with the editable install's finder removed, so that it cannot find the built one).
"""

import os
import shutil
import subprocess
import sys

import ugd_ops

PROBE = """
import sys, warnings
sys.meta_path[:] = [f for f in sys.meta_path
                    if not (getattr(f, "__module__", "") or type(f).__module__).startswith("__editable__")]
sys.path.insert(0, sys.argv[1])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import ugd_ops
    out = ugd_ops.partitioned_attention  # the reference still serves
assert ugd_ops.__file__.startswith(sys.argv[1]), ugd_ops.__file__
print("COMPILED", ugd_ops._backend.compiled)
for x in w:
    print("WARNING", x.message)
"""


def test_import_without_the_extension_says_it_is_not_built(tmp_path):
    src = os.path.dirname(ugd_ops.__file__)
    shutil.copytree(src, tmp_path / "ugd_ops",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "COMPILED False" in proc.stdout
    text = proc.stdout + proc.stderr
    assert "the compiled extension is not built" in text
    assert "pip install --no-build-isolation -e ." in text
    assert "circular import" not in text and "partially initialized" not in text
