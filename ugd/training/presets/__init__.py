"""Named argument sets for ``python -m ugd.train --preset NAME``: ``NAME.yaml`` in this folder.

    demo   the laptop demo (applied when no --train_file and no --preset is given)
    paper  the paper's fine-tuning recipe (lr 5e-6, batch 32, Adam 0.9/0.999, 4000 warm-up steps, 5 epochs)
"""

from __future__ import annotations

import os

PRESET_DIR = os.path.dirname(os.path.abspath(__file__))


def available() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def preset_path(name: str) -> str:
    path = os.path.join(PRESET_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(available())} (or a path to a YAML file "
                         "via --config)")
    return path
