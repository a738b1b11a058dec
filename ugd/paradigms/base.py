"""The Paradigm interface: what one training/serving paradigm (``ugd-ttm``, ``d2llm``, ...) implements.

A paradigm is one object, registered by name (``ugd.paradigms.register``). ``UGDModel``, the
collator, ``ugd.train``, ``ugd.predict``, the trainer and the inference API ask it instead of
branching on names. Adding a paradigm = one module under ``ugd/paradigms/`` with a subclass of
``Paradigm`` and one ``register(MyParadigm())`` call (``from .registry import register``: the registry
module, not the package, so that the package's ``__init__`` -> module import stays one-way), plus
the module's name in ``ugd.paradigms.BUILTIN_MODULES`` (or any import of the module before use, for
a third-party one). Paradigm modules must not import ``ugd.model``, ``ugd.serving.inference``,
``ugd.data.collator`` or ``ugd.train`` at import time (those import the registry); ``ugd.data.layout``,
``ugd.modules.packed``, ``ugd.modules.heads``, ``ugd.modules.losses`` and ``ugd_ops`` are fine.

What a paradigm declares (class attributes)
-------------------------------------------

``name``, ``family``, ``description``
    ``name`` is what ``UGDConfig.paradigm`` / ``--paradigm`` hold and what checkpoints store, so it
    never changes once released. ``family`` groups paradigms of one paper (``"ugd"``, ``"d2llm"``).

``parts``, ``mask``  -- the layout
    ``parts``: which spans of ``ugd.data.layout`` a training sample has: ``"qdpg"``, ``"qdp"``, ``"qd"``
    (see ``ugd.data.layout.PARTS``), or ``"q|d"`` for a query and a document laid out as two *separate*
    packed batches (then ``mask`` is ``None`` and each pack uses ``"bidirectional"``).
    ``mask``: the ``ugd_ops.row_intervals`` mask of the packed batch: ``"ttm"`` (Q and D each see
    only themselves, P and G see everything before them), ``"stm"`` (Q D P see each other), ``"causal"``
    or ``"bidirectional"``. The collator packs samples with it and ``UGDModel.encode`` runs the packed
    batch through ``ugd_ops.partitioned_attention`` (``attn_implementation="ugd"``), no T x T mask.

``terms``, ``term_weights``, ``options``  -- loss terms and their weights
    ``terms``: the loss terms the paradigm trains, in a fixed order (``UGDOutput.terms`` keys, logged
    as ``loss_<term>``). ``term_weights``: term -> name of its weight, either a ``UGDConfig`` field
    (the UGD family's ``alpha``, ``beta``, ``gamma``, ``lam``, ``mu``) or one of the paradigm's
    ``options``. A zero weight switches the term off (``active_terms``) and the forward does not
    compute what only it needs. ``options``: option name -> default; a config stores the options it
    sets in ``UGDConfig.options`` (``--paradigm_options '{"name": value}'`` in ``ugd.train``);
    ``check_config`` rejects unknown names and bad values. Options hold paradigm hyperparameters
    (loss weights, temperatures, head sizes, a teacher path, ...).

``capabilities``  -- what it can do at inference (``serves(config)`` may narrow it per config)
    A subset of ``CAPABILITIES``: ``"encode_queries"``, ``"encode_documents"`` (a vector per text,
    each text encoded alone), ``"score_pairs"`` (class probabilities of (query vector, document
    vector) pairs without the backbone), ``"rank"`` (one query against many documents, texts or
    stored vectors), ``"single_tower"`` (class probabilities of (query, document) pairs encoded
    together, spans Q D P), ``"generate"`` (a reason per pair). ``MODE_NEEDS`` says which
    capabilities each mode of ``ugd.predict`` / ``model.predict`` needs; ``check_mode`` refuses a mode
    with a message naming the modes the paradigm serves.

``two_backbones``      the model holds a second backbone for documents (the ``ttm`` baseline).
``prefill_mask``       the mask a reason is prefilled with (paradigms with ``"generate"``).
``single_tower_mask``  the mask single-tower inference packs Q D P with (paradigms with ``"single_tower"``); read
                       it through ``single_tower_mask_of(config)``, which an option may change.
``train_defaults``     ``ugd.train`` argument name -> value the paradigm trains with unless the preset,
                       config file or command line sets that argument (``flipped-kd``: ``{"lora_r": 8}``);
                       default ``{}``.

What a paradigm implements (methods; each gets the model, never imports ``ugd.model``)
-------------------------------------------------------------------------------------

``build_heads(config, hidden_size) -> nn.Module``
    Everything the paradigm adds to the backbone. ``UGDModel.heads`` holds it; ``save_pretrained``
    writes its ``state_dict`` to ``ugd_heads.safetensors`` and ``from_pretrained`` loads it back.
``forward(model, batch, compute) -> UGDOutput``
    One collated batch -> ``UGDOutput``: ``terms`` (each active term, unweighted), ``loss``
    (``sum(weight(term) * value)``: use ``self.total(config, terms)``), ``logits_t`` (two-tower
    ``[B, C]``), ``logits_s`` (single-tower ``[B, C]``). In training mode the active terms decide what
    runs; ``compute`` (a tuple of ``"two_tower"``, ``"single_tower"``, ``"gen"``) asks for outputs in
    eval mode (then no loss term is computed unless ``compute`` is None). ``model.encode(pack)`` gives
    the last hidden states ``[T, H]`` of a packed batch; ``ugd.modules.packed`` has the gather/pad helpers;
    reuse ``ugd_ops.detached_kl`` (distillation KL, teacher side detached) and
    ``ugd_ops.linear_cross_entropy`` (LM likelihoods, never the whole ``[N, V]`` logits).
``collate(collator, records) -> dict``
    Default: ``collator.pack_records(records)`` (one pack of ``parts`` with ``mask``, or two packs for
    ``"q|d"``). Override to add fields (e.g. teacher scores read from the records). The collator
    holds the tokenizer (``collator.tokenizer``, special ids ``collator.ids``), the layout
    (``collator.layout``) and, when ``ugd.train`` built it, the model's config (``collator.model_config``).
``setup(model)``
    Called once at the end of ``UGDModel.__init__`` (e.g. to check the backbone).
``unused_parameters(model) -> list[str]``
    Names (as in ``model.named_parameters()``) of trainable parameters no training step uses: DDP
    needs ``find_unused_parameters=True`` exactly when this is not empty.

Inference hooks (``ugd.serving.inference`` and ``ugd.serving.doc_vectors`` call these; only for the capabilities
the paradigm has):

``side_backbone(model, side)`` / ``side_vectors(model, hidden, pack, side) -> [N, V]``
    A lone query (``side="query"``, parts ``"q"``) or document (``"document"``, parts ``"d"``) is
    packed with the ``"bidirectional"`` mask and run through ``side_backbone``; ``side_vectors``
    turns the hidden states into one vector per text (default: the span's ``[CLS]``).
    ``vector_size(model)`` is V.
``query_part(model, v_q)``, ``document_part(model, v_d)``, ``logits_from_parts(model, qp, dp)``
    Two-tower scoring split so that ranking one query against M stored documents projects each
    document once (``DocumentVectors.projected``): ``logits_from_parts`` broadcasts ``qp [..., K]``
    against ``dp [..., K]`` to logits ``[..., C]``. ``pair_logits(model, v_q, v_d)`` (aligned pairs)
    defaults to the three composed. Scores are class probabilities (softmax of the logits), so every
    paradigm is served and evaluated the same way (``positive_label``, ACC/AUC).
``single_tower_logits(model, hidden, pack) -> [N, C]``
    Logits of a packed batch of Q D P samples (packed with ``single_tower_mask``).

Who asks what: ``UGDConfig`` validates ``paradigm`` and ``options`` through the registry and gets
term weights from ``weight``; ``UGDModel.__init__`` calls ``build_heads`` and ``setup``;
``UGDModel.forward`` calls ``forward``; ``UGDCollator`` calls ``collate`` (``parts``/``mask``);
``ugd.train`` lists ``names()`` for ``--paradigm``, and generates reasons when ``"generate"`` is
served; the trainer asks ``serves`` which heads to evaluate and ``unused_parameters`` for DDP;
``ugd.predict`` calls ``check_mode`` before loading the model; ``ugd.serving.inference`` /
``ugd.serving.generate`` call ``check_mode`` and the inference hooks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..modules.packed import UGDOutput, gather_rows

#: What a paradigm can do at inference.
CAPABILITIES = ("encode_queries", "encode_documents", "score_pairs", "rank", "single_tower", "generate")

#: Inference mode -> the capabilities it needs (the modes of ``ugd.predict``; ``model.predict`` uses
#: two_tower and single_tower, ``model.generate_reason`` reason).
MODE_NEEDS = {
    "two_tower": ("encode_queries", "encode_documents", "score_pairs"),
    "documents": ("encode_documents",),
    "single_tower": ("single_tower",),
    "reason": ("generate",),
}

#: Span index of each side in ``pack["cls_index"]`` / ``spans``.
SIDE_SPAN = {"query": 0, "document": 1}


class Paradigm:
    """Base class of a paradigm; see the module docstring for what a subclass declares and implements."""

    name: str = ""
    family: str = ""
    description: str = ""
    parts: str = "qdpg"
    mask: str | None = "ttm"
    terms: tuple[str, ...] = ()
    term_weights: dict = {}
    options: dict = {}
    capabilities: frozenset = frozenset()
    two_backbones: bool = False
    prefill_mask: str | None = None
    single_tower_mask: str | None = None
    train_defaults: dict = {}

    # ------------------------------------------------------------------ configuration

    def check_config(self, config) -> None:
        """Raises ValueError for options this paradigm does not have (or bad values: extend in subclasses)."""
        unknown = sorted(set(config.options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"paradigm {self.name!r} has no option(s) {unknown}; its options are: {known}")
        for term in self.terms:
            w = self.weight(config, term)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
                raise ValueError(f"the weight of loss term {term!r} ({self.term_weights.get(term)}) must be a "
                                 f"number >= 0, got {w!r}")

    def option(self, config, name: str):
        """The value of option ``name``: the config's, else the default."""
        if name not in self.options:
            raise KeyError(f"paradigm {self.name!r} has no option {name!r}")
        return config.options.get(name, self.options[name])

    def weight(self, config, term: str) -> float:
        """The weight of loss term ``term`` (a ``UGDConfig`` field or an option, per ``term_weights``)."""
        name = self.term_weights[term]
        if name in self.options:
            return self.option(config, name)
        return getattr(config, name)

    def active_terms(self, config) -> tuple[str, ...]:
        """The loss terms trained with a non-zero weight."""
        return tuple(t for t in self.terms if float(self.weight(config, t)) != 0)

    def total(self, config, terms: dict, scales: dict | None = None) -> torch.Tensor | None:
        """The training loss: the weighted sum of ``terms`` (None when there is none); ``scales`` (term ->
        factor) multiplies a weight for this step (a schedule)."""
        if not terms:
            return None
        scales = scales or {}
        return sum(float(self.weight(config, t)) * scales.get(t, 1.0) * v for t, v in terms.items())

    def single_tower_mask_of(self, config) -> str | None:
        """The mask single-tower inference packs Q D P with for a model of ``config`` (default:
        ``single_tower_mask``; an option may change it, as ``ugd-ttm``'s ``teacher_mask``)."""
        return self.single_tower_mask

    def serves(self, config) -> frozenset:
        """The capabilities of a model with this config (default: ``capabilities``)."""
        return frozenset(self.capabilities)

    def modes(self, config) -> list[str]:
        """The inference modes (``MODE_NEEDS`` keys) this config serves."""
        caps = self.serves(config)
        return [m for m, need in MODE_NEEDS.items() if all(c in caps for c in need)]

    def check_mode(self, config, mode: str) -> None:
        """A ValueError naming the usable modes when ``mode`` needs a capability this config lacks."""
        if mode not in MODE_NEEDS:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODE_NEEDS)}")
        caps = self.serves(config)
        missing = [c for c in MODE_NEEDS[mode] if c not in caps]
        if missing:
            usable = [m.replace("_", "-") for m in self.modes(config)]
            why = self.why_not(config, missing)
            raise ValueError(f"paradigm {self.name!r} cannot serve mode {mode.replace('_', '-')} (it has no "
                             f"{', '.join(missing)}{'; ' + why if why else ''}); "
                             f"it serves: {', '.join(usable) if usable else 'nothing'}")

    def why_not(self, config, missing: Sequence[str]) -> str:
        """An optional explanation appended to ``check_mode``'s refusal (e.g. which option removes it)."""
        return ""

    # ------------------------------------------------------------------ model

    def build_heads(self, config, hidden_size: int) -> nn.Module:
        raise NotImplementedError(f"paradigm {self.name!r} does not implement build_heads")

    def setup(self, model) -> None:
        """Called at the end of ``UGDModel.__init__``."""

    def forward(self, model, batch: dict, compute: tuple[str, ...] | None) -> UGDOutput:
        raise NotImplementedError(f"paradigm {self.name!r} does not implement forward")

    def training_terms(self, model, compute) -> set:
        """The loss terms a forward computes: the active ones, unless an eval call asked for outputs."""
        return set(self.active_terms(model.config)) if model.training or compute is None else set()

    def unused_parameters(self, model) -> list[str]:
        return []

    @staticmethod
    def lm_head_only_parameters(backbone, prefix: str) -> list[str]:
        """Names (``prefix.<name>``) of the trainable parameters of ``backbone``'s LM head that its input
        embeddings do not share: what a step without an LM loss leaves without gradient. None with tied
        weights -- compared by identity, so peft's wrappers (LoRA, trainable tokens) count as tied too."""
        if backbone is None:
            return []
        out, inp = backbone.get_output_embeddings(), backbone.get_input_embeddings()
        if out is None:
            return []
        shared = {id(p) for p in inp.parameters()} if inp is not None else set()
        own = {id(p) for p in out.parameters() if p.requires_grad and id(p) not in shared}
        return [f"{prefix}.{n}" for n, p in backbone.named_parameters() if id(p) in own]

    # ------------------------------------------------------------------ collation

    def collate(self, collator, records) -> dict:
        return collator.pack_records(records)

    # ------------------------------------------------------------------ inference hooks

    def side_backbone(self, model, side: str) -> nn.Module:
        return model.backbone

    def vector_size(self, model) -> int:
        return model.backbone.config.get_text_config().hidden_size

    def side_vectors(self, model, hidden: torch.Tensor, pack: dict, side: str) -> torch.Tensor:
        return gather_rows(hidden, pack["cls_index"][:, SIDE_SPAN[side]], side)

    def query_part(self, model, v_q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"paradigm {self.name!r} has no two-tower scoring")

    def document_part(self, model, v_d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"paradigm {self.name!r} has no two-tower scoring")

    def logits_from_parts(self, model, query_part: torch.Tensor, document_part: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"paradigm {self.name!r} has no two-tower scoring")

    def pair_logits(self, model, v_q: torch.Tensor, v_d: torch.Tensor) -> torch.Tensor:
        return self.logits_from_parts(model, self.query_part(model, v_q), self.document_part(model, v_d))

    def single_tower_logits(self, model, hidden: torch.Tensor, pack: dict) -> torch.Tensor:
        raise NotImplementedError(f"paradigm {self.name!r} has no single-tower head")

    def __repr__(self) -> str:
        return f"<paradigm {self.name!r} ({self.family}): parts {self.parts}, mask {self.mask}, terms {self.terms}>"


__all__ = ["CAPABILITIES", "MODE_NEEDS", "SIDE_SPAN", "Paradigm"]
