"""A frozen teacher: a separately trained UGD checkpoint with a single tower, read beside a student's
forward on the student's own packed batch (``d2llm``'s and ``ugd-ttm``'s option ``teacher``).

The teacher is loaded once per model object, frozen, and kept in the model's ``__dict__``: not a submodule,
so it is never saved with the student, never trained and never moved by ``model.to``.
"""

from __future__ import annotations

import torch

import ugd_ops

from ..modules.packed import gather_rows
from .registry import names

_ATTR = "_frozen_teacher"


def with_mask(batch: dict, mask: str) -> dict:
    """``batch`` with the row intervals of ``mask`` over the same tokens (docs/spec.md section 3): the
    same spans, positions and labels, another attention partition."""
    device = batch["kv_start"].device
    cu, ks, ke = ugd_ops.row_intervals(batch["spans"].cpu(), mask)
    return dict(batch, cu_seqlens=cu.to(device), kv_start=ks.to(device), kv_end=ke.to(device))


def frozen_teacher(model, path: str, who: str):
    """The teacher checkpoint ``path`` of ``model`` (``who``: the paradigm, for messages), loaded on the
    first call in the heads' dtype and device, in eval mode, without gradients."""
    teacher = model.__dict__.get(_ATTR)
    if teacher is not None:
        return teacher
    try:
        teacher = type(model).from_pretrained(path, dtype=model.head_dtype)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise FileNotFoundError(f"the {who} option teacher: {e}; give the folder of a trained UGD checkpoint with a "
                                f"single tower (e.g. one `python -m ugd.train --paradigm stm` wrote)") from None
    if "single_tower" not in teacher.paradigm.serves(teacher.config):
        raise ValueError(f"the {who} teacher {path} (paradigm {teacher.config.paradigm!r}) has no single-tower head; "
                         f"a cross-encoder teacher needs one (paradigms {names(capability='single_tower')})")
    mine, theirs = model.config.special_token_ids, teacher.config.special_token_ids
    if mine and theirs and mine != theirs or (model.tokenizer is not None and teacher.tokenizer is not None
                                              and len(model.tokenizer) != len(teacher.tokenizer)):
        raise ValueError(f"the {who} teacher {path} has another tokenizer (special tokens {theirs}, this model's "
                         f"{mine}); the teacher reads the student's token ids, so both must share one tokenizer")
    teacher.to(model.head_device).eval().requires_grad_(False)
    model.__dict__[_ATTR] = teacher
    return teacher


@torch.no_grad()
def teacher_outputs(teacher, batch: dict, batch_mask: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(single-tower logits ``[B, C]``, the single-tower ``[CLS]`` state ``[B, H_T]``) of the frozen
    ``teacher`` on the student's packed ``batch`` (spans Q D P [G], packed with ``batch_mask``), repacked
    with the teacher's own single-tower mask. A G span changes nothing: its rows come after P, and P's
    rows never read them under either mask."""
    tp = teacher.paradigm
    mask = tp.single_tower_mask_of(teacher.config)
    pack = batch if mask == batch_mask else with_mask(batch, mask)
    h = teacher.encode(pack)
    return tp.single_tower_logits(teacher, h, pack), gather_rows(h, pack["cls_index"][:, 2], "prompt (teacher)")


__all__ = ["frozen_teacher", "teacher_outputs", "with_mask"]
