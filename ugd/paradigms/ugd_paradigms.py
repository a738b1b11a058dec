"""The five paradigms of the UGD paper (docs/spec.md sections 5-7): ugd-ttm, ugd-stm, shared-ttm, ttm, stm.

One class, five instances: they share the heads (``ugd.modules.heads.UGDHeads``: FC_t, the shared
classifier FC, the KL projections), the losses of ``ugd.modules.losses`` and the forward; they differ in
layout, loss terms and which towers exist.

    ugd-ttm     Q D P G, TTM mask   L_t = a CE_t + b CE_s + g L_gen + lam KL(P||sg Q) + mu KL(T||sg S)
    ugd-stm     Q D P G, STM mask   L_s = b CE_s + g L_gen
    shared-ttm  Q D,     TTM mask   a CE_t                      (one shared backbone)
    ttm         Q | D,   two packs  a CE_t                      (a second backbone for documents)
    stm         Q D P,   STM mask   b CE_s

The weights are the ``UGDConfig`` fields ``alpha``, ``beta``, ``gamma``, ``lam``, ``mu`` (top-level
fields, not paradigm options, because checkpoints store them there).

``ugd-ttm``'s options steer the distillation (docs/paradigms.md, "Levers on the teacher"; the defaults
are the paper's):

    kl_gate          "none": every sample distils (paper eq. 4-5);
                     "correct": only samples whose single tower predicts the gold label;
                     "margin": only samples where the single tower gives the gold label more probability
                     than the two tower (p_s(y) > p_t(y)).
                     A gated KL term is sum_i g_i KL_i / B: a sample without the gate adds nothing.
    kl_warmup_steps  N > 0 ramps the KL weights linearly, lam * min(1, (step + 1) / N) (and mu alike),
                     step the 0-based optimizer step: the single tower learns before it teaches.
    kl_switch        "none": the KL terms always train (paper);
                     "teacher_ahead": they train only while the single tower's running accuracy on the
                     training batches is above the two tower's (both bias-corrected exponential moving
                     averages over about ``kl_switch_window`` batches, and none before that many batches):
                     a weaker teacher never teaches. The averages are a buffer of the heads
                     (``kl_running_acc``), saved with every checkpoint, so a resumed run decides alike.
    kl_switch_lead   how far the single tower's running accuracy must lead (default 0.0: any lead).
                     While both heads are at chance their averages cross by noise; a lead above that
                     noise (about 3 standard errors, docs/paradigms.md) keeps the switch off there.
    teacher_mask     "ttm": the single tower reads Q and D under the TTM mask, i.e. only through the
                     few P positions (paper); "stm": a second pass over the same tokens under the STM
                     mask, where Q, D and P attend to one another in every layer, gives the single tower
                     (its CE, the KL targets, and single-tower inference). The two tower and the reason
                     generator stay on the TTM pass. Costs one more forward and backward per batch.
    teacher          None: the KL targets are the model's own single tower (paper); a path: those of a
                     separately trained UGD checkpoint with a single tower (e.g. an ``stm`` model),
                     loaded once and frozen (as D2LLM distils a fine-tuned cross-encoder). The own
                     single tower still trains with CE (beta) and still serves single-tower inference.
"""

from __future__ import annotations

import torch

from ..modules.heads import UGDHeads
from ..modules.losses import TERM_WEIGHTS, classification_loss, distillation_loss, generation_loss
from ..modules.packed import UGDOutput, gather_rows
from ._frozen_teacher import frozen_teacher, teacher_outputs, with_mask
from .registry import register
from .base import Paradigm

_TWO_TOWER = frozenset({"encode_queries", "encode_documents", "score_pairs", "rank"})

#: The per-sample gates of the KL terms (the ``kl_gate`` option).
KL_GATES = ("none", "correct", "margin")
#: The run-level switches of the KL terms (the ``kl_switch`` option).
KL_SWITCHES = ("none", "teacher_ahead")
#: The masks the single tower may read Q and D under (the ``teacher_mask`` option).
TEACHER_MASKS = ("ttm", "stm")
_KL_OPTIONS = {"kl_gate": "none", "kl_warmup_steps": 0, "kl_switch": "none", "kl_switch_window": 50,
               "kl_switch_lead": 0.0, "teacher_mask": "ttm", "teacher": None}
_KL_TERMS = ("kl", "kl_emb")


def kl_gate(kind: str, logits_t: torch.Tensor, logits_s: torch.Tensor, labels: torch.Tensor | None):
    """The per-sample gate ``[B]`` (0 or 1, fp32) of the KL terms; None for ``"none"`` (all samples).

    Decided without gradient on the plain (temperature 1) class probabilities. A sample without a
    label (-100) is never distilled under a gate that needs the label.
    """
    if kind == "none":
        return None
    with torch.no_grad():
        if labels is None:
            return torch.zeros(logits_t.shape[0], device=logits_t.device)
        has = labels != -100
        y = labels.clamp_min(0).unsqueeze(1)
        if kind == "correct":
            keep = logits_s.argmax(-1) == labels
        elif kind == "margin":
            p_s = torch.softmax(logits_s.float(), -1).gather(1, y).squeeze(1)
            p_t = torch.softmax(logits_t.float(), -1).gather(1, y).squeeze(1)
            keep = p_s > p_t
        else:
            raise ValueError(f"unknown kl_gate {kind!r}; expected one of {KL_GATES}")
        return (keep & has).float()


def kl_ramp(warmup_steps: int, step: int | None) -> float:
    """The factor on the KL weights at optimizer step ``step`` (0-based: the step being taken)."""
    if warmup_steps <= 0:
        return 1.0
    if step is None:
        raise ValueError("kl_warmup_steps needs the training step: set model.training_step before each forward "
                         "(UGDTrainer does), or train with kl_warmup_steps 0")
    return min(1.0, (step + 1) / warmup_steps)


def running_acc_update(state: torch.Tensor, acc_t: torch.Tensor, acc_s: torch.Tensor, window: int) -> None:
    """Folds one training batch's accuracies into ``state`` = [sum_t, sum_s, batches] in place:
    exponential moving sums with decay 1 - 1/window (bias-corrected in ``running_acc``); the batch count
    stops at 10 windows, where the correction is below 1e-4 (and a bf16 buffer still counts exactly)."""
    decay = 1.0 - 1.0 / window
    with torch.no_grad():
        state[0].mul_(decay).add_(acc_t.to(state.dtype), alpha=1 - decay)
        state[1].mul_(decay).add_(acc_s.to(state.dtype), alpha=1 - decay)
        state[2].fill_(min(float(state[2]) + 1, 10 * window))


def running_acc(state: torch.Tensor, window: int) -> tuple[float, float] | None:
    """(two tower, single tower) running accuracy of ``state``, or None before ``window`` batches."""
    n = float(state[2])
    if n < window:
        return None
    correction = 1.0 - (1.0 - 1.0 / window) ** n
    return float(state[0]) / correction, float(state[1]) / correction


def kl_switch_factor(kind: str, state: torch.Tensor | None, window: int, training: bool,
                     lead: float = 0.0) -> float:
    """1.0 where the KL terms train at this forward, else 0.0 (the ``kl_switch`` option): for
    ``teacher_ahead``, where the single tower's running accuracy exceeds the two tower's by more than
    ``lead``."""
    if kind == "none":
        return 1.0
    if kind != "teacher_ahead":
        raise ValueError(f"unknown kl_switch {kind!r}; expected one of {KL_SWITCHES}")
    if state is None:
        raise ValueError("kl_switch teacher_ahead needs the heads' kl_running_acc buffer (built by the paradigm)")
    if not training and float(state[2]) == 0:
        return 1.0  # an evaluation before any training batch reports the full objective (as the warm-up does)
    acc = running_acc(state, window)
    return 1.0 if acc is not None and acc[1] - acc[0] > lead else 0.0


class UGDParadigm(Paradigm):
    family = "ugd"
    term_weights = dict(TERM_WEIGHTS)

    def __init__(self, name: str, parts: str, mask: str | None, terms: tuple[str, ...], *, two_tower: bool,
                 single_tower: bool, generative: bool, description: str):
        self.name = name
        self.parts = parts
        self.mask = mask
        self.terms = terms
        self.description = description
        self.two_tower = two_tower
        self.single_tower = single_tower
        caps = set(_TWO_TOWER) if two_tower else set()
        if single_tower:
            caps |= {"single_tower", "rank"}
            self.single_tower_mask = mask
        if generative:
            caps.add("generate")
            self.prefill_mask = mask
        self.capabilities = frozenset(caps)
        self.two_backbones = mask is None
        # a subclass's own options (class attribute) and, where a KL term trains, the distillation levers
        self.options = {**type(self).options, **(_KL_OPTIONS if "kl" in terms else {})}

    def check_config(self, config) -> None:
        super().check_config(config)
        if "kl_gate" not in self.options:
            return
        gate = self.option(config, "kl_gate")
        if gate not in KL_GATES:
            raise ValueError(f"paradigm option kl_gate must be one of {', '.join(KL_GATES)}, got {gate!r}")
        steps = self.option(config, "kl_warmup_steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"paradigm option kl_warmup_steps must be an int >= 0, got {steps!r}")
        switch = self.option(config, "kl_switch")
        if switch not in KL_SWITCHES:
            raise ValueError(f"paradigm option kl_switch must be one of {', '.join(KL_SWITCHES)}, got {switch!r}")
        window = self.option(config, "kl_switch_window")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"paradigm option kl_switch_window must be an int >= 1, got {window!r}")
        lead = self.option(config, "kl_switch_lead")
        if isinstance(lead, bool) or not isinstance(lead, (int, float)) or not 0 <= lead < 1:
            raise ValueError(f"paradigm option kl_switch_lead must be a number in [0, 1) (an accuracy "
                             f"difference), got {lead!r}")
        mask = self.option(config, "teacher_mask")
        if mask not in TEACHER_MASKS:
            raise ValueError(f"paradigm option teacher_mask must be one of {', '.join(TEACHER_MASKS)}, got {mask!r}")
        teacher = self.option(config, "teacher")
        if teacher is not None and (not isinstance(teacher, str) or not teacher):
            raise ValueError(f"paradigm option teacher must be null (the model's own single tower) or the path of a "
                             f"UGD checkpoint with a single tower (e.g. a trained stm model), got {teacher!r}")

    def single_tower_mask_of(self, config) -> str | None:
        if self.single_tower and "teacher_mask" in self.options:
            return self.option(config, "teacher_mask")
        return self.single_tower_mask

    def frozen_teacher_path(self, config) -> str | None:
        """The checkpoint whose single tower gives the KL targets (option ``teacher``), or None (the own)."""
        return self.option(config, "teacher") if "teacher" in self.options else None

    # ------------------------------------------------------------------ model

    def build_heads(self, config, hidden_size: int) -> UGDHeads:
        heads = UGDHeads(hidden_size, config.num_labels, config.kl_dim, two_tower=self.two_tower,
                         single_tower=self.single_tower, activation=config.head_activation)
        if "kl_switch" in self.options and self.option(config, "kl_switch") != "none":
            # [sum_t, sum_s, batches] of kl_switch's running accuracies: a persistent buffer, so it is in every
            # checkpoint's heads file and a resumed run switches as the uninterrupted one would
            heads.register_buffer("kl_running_acc", torch.zeros(3, dtype=torch.float32))
        return heads

    def needed(self, model, compute) -> dict:
        """Which outputs to compute: those the active loss terms need, plus ``compute``."""
        terms = self.training_terms(model, compute)
        want = set(compute or ())
        # a KL gate or switch compares the two heads' predictions, so it needs both logits even for kl_emb alone
        gated = bool(terms & set(_KL_TERMS)) and (self.option(model.config, "kl_gate") != "none"
                                                  or self.option(model.config, "kl_switch") != "none")
        need = {
            "logits_t": bool(terms & {"cls_t", "kl"}) or gated or "two_tower" in want,
            "logits_s": bool(terms & {"cls_s", "kl"}) or gated or "single_tower" in want,
            "emb": "kl_emb" in terms,
            "gen": "gen" in terms or "gen" in want,
        }
        if need["logits_t"] and not self.two_tower:
            raise ValueError(f"paradigm {self.name!r} has no two-tower head")
        if need["logits_s"] and not self.single_tower:
            raise ValueError(f"paradigm {self.name!r} has no single-tower head")
        need["v_qd"] = need["logits_t"] or need["emb"]
        need["v_s"] = need["logits_s"] or need["emb"]
        return need

    def forward(self, model, batch: dict, compute) -> UGDOutput:
        cfg, heads = model.config, model.heads
        need = self.needed(model, compute)
        out = UGDOutput()
        labels = batch["labels"]
        if self.two_backbones:
            out.v_q = gather_rows(model.encode(batch["query"]), batch["query"]["cls_index"][:, 0], "query")
            out.v_d = gather_rows(model.encode(batch["document"], backbone=model.document_backbone),
                                  batch["document"]["cls_index"][:, 1], "document")
            hidden = None
        else:
            hidden = model.encode(batch)
            cls_index = batch["cls_index"]
            if need["v_qd"]:
                out.v_q = gather_rows(hidden, cls_index[:, 0], "query")
                out.v_d = gather_rows(hidden, cls_index[:, 1], "document")
            if need["v_s"]:
                hidden_s = hidden
                single_mask = self.single_tower_mask_of(cfg)
                if single_mask != self.mask:
                    # the single tower's own pass: Q, D and P read one another in every layer (teacher_mask stm)
                    hidden_s = model.encode(with_mask(batch, single_mask))
                out.v_s = gather_rows(hidden_s, cls_index[:, 2], "single-tower")
        f_t = heads.two_tower_features(out.v_q, out.v_d) if (need["logits_t"] or need["emb"]) else None
        if need["logits_t"]:
            out.logits_t = heads.classifier(f_t)
        if need["logits_s"]:
            out.logits_s = heads.classifier(out.v_s)

        terms = {}
        have_labels = labels is not None and bool((labels != -100).any())
        active = self.training_terms(model, compute)
        if "cls_t" in active and have_labels:
            terms["cls_t"] = classification_loss(out.logits_t, labels)
        if "cls_s" in active and have_labels:
            terms["cls_s"] = classification_loss(out.logits_s, labels)
        if "gen" in active and hidden is not None and "lm_labels" in batch:
            terms["gen"] = generation_loss(hidden, model.backbone.get_output_embeddings(), batch["lm_labels"][0],
                                           batch["cu_seqlens"])
        scales = None
        # the KL targets: the own single tower (paper), or a frozen teacher checkpoint's (option teacher)
        z_teacher, v_teacher = out.logits_s, out.v_s
        path = self.frozen_teacher_path(cfg)
        if path is not None and active & set(_KL_TERMS):  # only ugd-ttm (one backbone) has the option
            z_teacher, v_teacher = teacher_outputs(frozen_teacher(model, path, self.name), batch, self.mask)
        if active & set(_KL_TERMS):
            gate = kl_gate(self.option(cfg, "kl_gate"), out.logits_t, z_teacher, labels)
            kl = dict(temperature=cfg.kl_temperature, detach=cfg.detach, gate=gate)
            if "kl" in active:
                terms["kl"] = distillation_loss(out.logits_t, z_teacher, **kl)
            if "kl_emb" in active:
                terms["kl_emb"] = distillation_loss(heads.fc_t_kl(f_t), heads.fc_s_kl(v_teacher.to(f_t.dtype)), **kl)
            step = getattr(model, "training_step", None)
            # an evaluation outside training (no step yet, e.g. a loaded model) reports the full objective
            ramp = kl_ramp(self.option(cfg, "kl_warmup_steps"), step) if model.training or step is not None else 1.0
            window = self.option(cfg, "kl_switch_window")
            switch = kl_switch_factor(self.option(cfg, "kl_switch"), getattr(heads, "kl_running_acc", None),
                                      window, model.training, float(self.option(cfg, "kl_switch_lead")))
            scales = {t: ramp * switch for t in _KL_TERMS}
            out.stats["kl_ramp"] = torch.tensor(ramp, device=out.v_s.device)
            if self.option(cfg, "kl_switch") != "none":
                out.stats["kl_switch"] = torch.tensor(switch, device=out.v_s.device)
            if gate is not None:
                out.stats["kl_gate"] = gate.mean()
        if model.training and out.logits_t is not None and out.logits_s is not None and have_labels:
            # the teacher against the student on the training batches (docs/results.md, the mechanism)
            with torch.no_grad():
                has = labels != -100
                out.stats["acc_t"] = (out.logits_t.argmax(-1) == labels)[has].float().mean()
                out.stats["acc_s"] = (out.logits_s.argmax(-1) == labels)[has].float().mean()
                acc_teacher = out.stats["acc_s"]
                if z_teacher is not out.logits_s:  # a frozen teacher: the switch compares the student with it
                    acc_teacher = out.stats["acc_teacher"] = (z_teacher.argmax(-1) == labels)[has].float().mean()
                state = getattr(heads, "kl_running_acc", None)
                if state is not None and bool(has.any()):
                    # after this batch's decision: the switch acts on the batches before it
                    running_acc_update(state, out.stats["acc_t"], acc_teacher, self.option(cfg, "kl_switch_window"))
        out.terms = terms
        out.loss = self.total(cfg, terms, scales)
        return out

    def unused_parameters(self, model) -> list[str]:
        cfg = model.config
        terms = set(self.active_terms(cfg))
        logits_t = bool(terms & {"cls_t", "kl"})
        logits_s = bool(terms & {"cls_s", "kl"})
        emb = "kl_emb" in terms
        unused_modules = []
        heads = model.heads
        if heads.fc_t is not None and not (logits_t or emb):
            unused_modules.append(("heads.fc_t", heads.fc_t))
        if not (logits_t or logits_s):
            unused_modules.append(("heads.classifier", heads.classifier))
        if heads.fc_t_kl is not None and not emb:
            unused_modules += [("heads.fc_t_kl", heads.fc_t_kl), ("heads.fc_s_kl", heads.fc_s_kl)]
        elif heads.fc_s_kl is not None and cfg.detach:
            # F^_s = FC_s^kl(V_s) appears only as the stop-gradient teacher of KL(T || sg(S)) (paper eq. 5):
            # with the detach no loss reaches FC_s^kl, it stays the random projection it was initialised as
            unused_modules.append(("heads.fc_s_kl", heads.fc_s_kl))
        names = [f"{prefix}.{n}" for prefix, mod in unused_modules for n, p in mod.named_parameters()
                 if p.requires_grad]
        if "gen" not in terms:
            names += self.lm_head_only_parameters(model.backbone, "backbone")
        # the document backbone (ttm) only encodes: its LM head never runs
        return names + self.lm_head_only_parameters(model.document_backbone, "document_backbone")

    # ------------------------------------------------------------------ inference hooks

    def side_backbone(self, model, side: str):
        if side == "document" and model.document_backbone is not None:
            return model.document_backbone
        return model.backbone

    def query_part(self, model, v_q: torch.Tensor) -> torch.Tensor:
        return model.heads.query_part(v_q)

    def document_part(self, model, v_d: torch.Tensor) -> torch.Tensor:
        return model.heads.document_part(v_d)

    def logits_from_parts(self, model, query_part: torch.Tensor, document_part: torch.Tensor) -> torch.Tensor:
        return model.heads.two_tower_logits_from_parts(query_part, document_part)

    def pair_logits(self, model, v_q: torch.Tensor, v_d: torch.Tensor) -> torch.Tensor:
        return model.heads.classifier(model.heads.two_tower_features(v_q, v_d))  # exactly the training head

    def single_tower_logits(self, model, hidden: torch.Tensor, pack: dict) -> torch.Tensor:
        return model.heads.classifier(gather_rows(hidden, pack["cls_index"][:, 2], "single-tower"))


UGD_TTM = register(UGDParadigm("ugd-ttm", "qdpg", "ttm", ("cls_t", "cls_s", "gen", "kl", "kl_emb"), two_tower=True,
                               single_tower=True, generative=True,
                               description="the full two-tower UGD: both towers, reasons, distillation"))
UGD_STM = register(UGDParadigm("ugd-stm", "qdpg", "stm", ("cls_s", "gen"), two_tower=False, single_tower=True,
                               generative=True, description="single-tower UGD (STM mask) with reasons"))
SHARED_TTM = register(UGDParadigm("shared-ttm", "qd", "ttm", ("cls_t",), two_tower=True, single_tower=False,
                                  generative=False, description="baseline: Q and D spans, one shared backbone"))
TTM = register(UGDParadigm("ttm", "q|d", None, ("cls_t",), two_tower=True, single_tower=False, generative=False,
                           description="baseline: two backbones, one for queries, one for documents"))
STM = register(UGDParadigm("stm", "qdp", "stm", ("cls_s",), two_tower=False, single_tower=True, generative=False,
                           description="baseline: Q D P spans, STM mask, no reason"))
