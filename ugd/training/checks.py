"""Checks ``python -m ugd.train`` runs on its arguments and data before building a model.

Each returns a one-line problem (the caller raises it as ``ugd.training.args.ConfigError``: one line on
stderr, exit 2) or None::

    problem = training_numbers_problem(run.training)   # --max_steps -5, --per_device_train_batch_size 0, --seed -1
    problem = output_dir_problem("/proc/out")          # a folder that cannot be created or written
    warning = label_gaps_warning(stats, num_labels)    # labels 0, 1, 2, 7: classes 3..6 never seen
"""

from __future__ import annotations

import os
import tempfile

from .._output_paths import nearest_existing

#: TrainingArguments fields that count things and must be >= 1
POSITIVE_COUNTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
MAX_LABELS_NAMED = 10


def training_numbers_problem(targs) -> str | None:
    """``--max_steps`` below -1 or a batch size / accumulation count below 1 (transformers accepts them
    and then trains the epochs silently or fails deep inside torch's sampler)."""
    # transformers reads max_steps <= 0 as "not set, train num_train_epochs"; -1 is its documented
    # "unset", any other negative value is a typo or a mistake worth stopping for
    max_steps = getattr(targs, "max_steps", -1)
    if max_steps < -1:
        return (f"--max_steps {max_steps}: expected a positive number of optimizer steps, or -1 (the default: "
                f"train --num_train_epochs epochs)")
    for name in POSITIVE_COUNTS:
        value = getattr(targs, name, 1)
        if value is not None and value < 1:
            return f"--{name} {value}: must be at least 1"
    # transformers.set_seed seeds numpy, which takes [0, 2**32) only: a negative seed ends in numpy's traceback
    for name in ("seed", "data_seed"):
        value = getattr(targs, name, None)
        if value is not None and not 0 <= value < 2 ** 32:
            return f"--{name} {value}: seeds are integers in [0, 2**32)"
    return None


def output_dir_problem(path) -> str | None:
    """Why ``path`` cannot be created (or written) as the run's output folder, found by making and
    removing a temporary folder in it (or in its nearest existing parent): permission bits say nothing
    for root, and /proc or a read-only mount refuse even root. Leaves no trace."""
    path = os.path.abspath(os.fspath(path))
    probe_in = nearest_existing(path)
    if os.path.islink(probe_in) and not os.path.exists(probe_in):
        return f"--output_dir {path}: {probe_in} is a broken symbolic link; remove it or name another folder"
    if not os.path.isdir(probe_in):
        what = "is" if probe_in == path else f"is under {probe_in}, which is"
        return f"--output_dir {path} {what} a file, not a folder; name a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ugd-write-check-", dir=probe_in))
    except OSError as e:
        # /proc answers "No such file or directory" to a new folder: name the folder that refused, not just errno
        return (f"--output_dir {path} cannot be created or written: {probe_in} does not accept new files or folders "
                f"({e.strerror}); name a writable folder")
    return None


def label_gaps_warning(stats, num_labels: int) -> str | None:
    """A warning when the training labels, from which ``num_labels`` was taken (max + 1), are not
    0, 1, ..., max: the classes in the gap would be trained as never occurring. ``stats`` is the
    training file's ``ugd.data.records.ReadStats`` (its ``label_lines``: label -> first line)."""
    seen = stats.label_lines
    missing = [c for c in range(num_labels) if c not in seen]
    if not missing:
        return None
    # the label that breaks the pattern: the earliest (by line) label above the first gap
    named = ", ".join(map(str, missing[:MAX_LABELS_NAMED])) + (", ..." if len(missing) > MAX_LABELS_NAMED else "")
    verb = "never occurs" if len(missing) == 1 else f"never occur ({len(missing)} classes)"
    fix = (f"training {num_labels} classes. Fix the file, or pass --num_labels {num_labels} to confirm the "
           "unused classes")
    above = [label for label in seen if label > missing[0]]
    if not above:  # only one class in the file (num_labels is at least 2)
        return f"the labels of {stats.path} are all {missing[0] - 1}: label {named} {verb}; {fix}"
    first = min(above, key=lambda label: seen[label])
    return (f"the labels of {stats.path} are not 0..{num_labels - 1} without gaps: label {named} {verb}, yet "
            f"label {first} does (first at {stats.path}:{seen[first]}); {fix}")
