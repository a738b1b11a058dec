"""UGDModel: any Hugging Face causal LM, the partition mask, the heads and the losses of docs/spec.md sections 5-6.

A checkpoint directory holds the backbone exactly as transformers saves it (so
``AutoModelForCausalLM.from_pretrained(path)`` still loads it), the tokenizer, ``ugd_config.json``
and ``ugd_heads.safetensors``; the `ttm` baseline keeps its document backbone in
``document_backbone/``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from . import checkpoint
from . import paradigms as _paradigms
from .backbones import resolve_backbone
from .checkpoint import CONFIG_NAME, DOCUMENT_BACKBONE_DIR, HEADS_NAME  # noqa: F401  (the checkpoint's file names)
from .data.layout import add_special_tokens
from .fingerprint import model_fingerprint, note_checkpoint_files
from .modules import attention  # noqa: F401  registers attn_implementation="ugd"
from .modules.packed import UGDOutput, encode_packed, move_batch, packed_inputs  # noqa: F401  (packed_inputs: re-exported)
# the serving functions are looked up at each call (ugd.serving.inference.encode_texts may be replaced, as tests do)
from .serving import generate, inference


@dataclass
class UGDConfig:
    """Everything UGDModel adds to its backbone. Loss weights default to the paper's (alpha = beta =
    gamma = 1, lambda = mu = 10); a zero weight switches a term (and any head only it needs) off."""

    paradigm: str = "ugd-ttm"
    num_labels: int = 2
    kl_dim: int = 256
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    lam: float = 10.0
    mu: float = 10.0
    detach: bool = True
    kl_temperature: float = 1.0
    head_activation: str = "gelu"
    layout: dict = field(default_factory=dict)  # ugd.data.layout.LayoutConfig as a dict
    special_token_ids: dict = field(default_factory=dict)  # {"cls", "gmask", "start", "eos"}
    # the paradigm's own settings (ugd.paradigms.base: Paradigm.options), only those set; a checkpoint
    # without this field loads as {}
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.paradigm not in _paradigms.names():
            raise ValueError(f"paradigm must be one of {_paradigms.names()}, got {self.paradigm!r}")
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a mapping of paradigm option names to values, got {self.options!r}")
        if self.num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {self.num_labels}")
        for name in ("alpha", "beta", "gamma", "lam", "mu"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be > 0, got {self.kl_temperature}")
        self.paradigm_impl.check_config(self)

    @property
    def paradigm_impl(self):
        """The registered ``ugd.paradigms.Paradigm`` called ``paradigm``."""
        return _paradigms.get(self.paradigm)

    def weight(self, term: str) -> float:
        return float(self.paradigm_impl.weight(self, term))

    def option(self, name: str):
        """The value of the paradigm option ``name`` (this config's, else the paradigm's default)."""
        return self.paradigm_impl.option(self, name)

    @property
    def active_terms(self) -> tuple[str, ...]:
        """The loss terms this paradigm trains with a non-zero weight."""
        return self.paradigm_impl.active_terms(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        """JSON text (what transformers' loggers, e.g. TensorBoard's, record of a model config)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "UGDConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UGDConfig fields: {sorted(unknown)}")
        return cls(**d)


class UGDModel(nn.Module):
    """A UGD matcher on a causal-LM backbone loaded with ``attn_implementation="ugd"``."""

    def __init__(self, backbone: nn.Module, config: UGDConfig, document_backbone: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        paradigm = config.paradigm_impl
        if paradigm.two_backbones and document_backbone is None:
            raise ValueError(f"the {config.paradigm!r} paradigm needs a second backbone for documents "
                             "(document_backbone=...)")
        self.document_backbone = document_backbone
        self.tokenizer = None  # set by from_backbone / from_pretrained; the inference methods use it
        self._heads_digest = None  # (sha256 of the heads file it was loaded from, parameter versions then)
        # the optimizer step being taken (0-based), for schedules inside the loss (ugd-ttm's kl_warmup_steps);
        # UGDTrainer sets it before each training forward, a hand-written loop sets it itself
        self.training_step: int | None = None
        hidden = backbone.config.get_text_config().hidden_size
        self.heads = paradigm.build_heads(config, hidden)
        paradigm.setup(self)

    @property
    def paradigm(self):
        """The ``ugd.paradigms.Paradigm`` this model trains and serves (``config.paradigm`` names it)."""
        return self.config.paradigm_impl

    @property
    def _no_split_modules(self) -> list[str]:
        # The backbones' own (e.g. ["Qwen2DecoderLayer"]): FSDP's transformer auto-wrap (accelerate, Trainer's
        # --fsdp "full_shard auto_wrap") reads it to shard decoder layer by decoder layer; device_map too
        names = []
        for bb in (self.backbone, self.document_backbone):
            for name in getattr(bb, "_no_split_modules", None) or ():
                if name not in names:
                    names.append(name)
        return names

    @property
    def head_device(self) -> torch.device:
        """Where the heads (and the batches they take) live."""
        return next(self.heads.parameters()).device

    @property
    def head_dtype(self) -> torch.dtype:
        return next(self.heads.parameters()).dtype

    # ------------------------------------------------------------------ construction and storage

    @classmethod
    def from_backbone(cls, backbone, tokenizer, config: UGDConfig | None = None, **overrides) -> "UGDModel":
        """Wraps a causal LM (a model; or a local folder, a .gguf file or a name of ``ugd.backbones``) for UGD: adds the
        special tokens to ``tokenizer`` and resizes the embeddings."""
        config = dataclasses.replace(config or UGDConfig(), **overrides)
        if isinstance(backbone, (str, os.PathLike)):
            path = resolve_backbone(backbone)  # a folder as it is; a .gguf file or a registered name dequantised once
            backbone = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ugd")
            document = (AutoModelForCausalLM.from_pretrained(path, attn_implementation="ugd")
                        if config.paradigm_impl.two_backbones else None)
        else:
            backbone.set_attn_implementation("ugd")
            document = None
            if config.paradigm_impl.two_backbones:
                document = copy.deepcopy(backbone)
        ids = add_special_tokens(tokenizer, backbone)
        if document is not None:
            document.resize_token_embeddings(len(tokenizer))
        config.special_token_ids = ids
        model = cls(backbone, config, document)
        model.tokenizer = tokenizer
        return model

    def save_pretrained(self, path: str, tokenizer=None, **kwargs) -> None:
        """Writes the checkpoint (backbone, heads, ugd_config.json) and ``tokenizer`` (default: the
        model's own, ``self.tokenizer``) to ``path``."""
        checkpoint.write_checkpoint(path, backbone=self.backbone, document_backbone=self.document_backbone,
                                    heads_state=self._heads_state(), config=self.config.to_dict(),
                                    tokenizer=tokenizer if tokenizer is not None else self.tokenizer, save_kwargs=kwargs)

    def _heads_state(self) -> dict:
        return {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}

    def _heads_versions(self) -> tuple:
        # which tensors the heads hold and how often each was written in place (an optimizer step, a
        # load_state_dict); .to(dtype/device) keeps both, so a dtype change keeps the name
        return tuple((id(p), p._version) for p in self.heads.parameters())

    def fingerprint(self) -> str:
        """A name for these weights, for data derived from them (stored document vectors).

        A SHA-256 over everything that determines V_D and the scores: the backbone weights (of the
        safetensors files a checkpoint was loaded from, so loading it in another dtype keeps the name;
        otherwise of the tensors as they are now), the heads, the backbone config and the UGD config
        (``ugd.fingerprint``). Remembered until a parameter is written in place or replaced, so calling
        it per request costs nothing.
        """
        return model_fingerprint(self)

    @classmethod
    def from_pretrained(cls, path: str, tokenizer=None, **backbone_kwargs) -> "UGDModel":
        """Loads a checkpoint written by ``save_pretrained`` (or by ``python -m ugd.train``).

        ``tokenizer``: default, the one saved in ``path`` (if any; the inference methods need one).
        ``backbone_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...;
        ``attn_implementation`` defaults to "ugd").
        """
        config = UGDConfig.from_dict(checkpoint.read_config(path))
        backbone_kwargs.setdefault("attn_implementation", "ugd")
        backbone, document = checkpoint.load_backbones(path, two_backbones=config.paradigm_impl.two_backbones,
                                                       **backbone_kwargs)
        model = cls(backbone, config, document)
        heads, digest = checkpoint.read_heads(path)
        model.heads.load_state_dict(heads)
        first = next(backbone.parameters())
        model = model.to(first.dtype)
        model.heads.to(first.device)  # with device_map the backbone is already placed; the heads follow it
        model._heads_digest = (digest, model._heads_versions())
        note_checkpoint_files(model, path)  # the fingerprint hashes the backbone's files, lazily
        if tokenizer is None:
            tokenizer = checkpoint.read_tokenizer(path, config.special_token_ids)
        model.tokenizer = tokenizer
        return model

    # ------------------------------------------------------------------ forward

    def encode(self, pack: dict, *, backbone: nn.Module | None = None) -> torch.Tensor:
        """Last hidden states [T, H] (after the backbone's final norm) of a packed batch.

        With ``attn_implementation="ugd"`` the layout goes to the partitioned-attention kernels. Any
        other implementation (eager, sdpa) gets the same layout as a dense additive 4D mask: the
        reference path, O(T^2) memory, for checks and comparisons only.
        """
        return encode_packed(backbone or self.backbone, pack)

    def needed(self, compute: tuple[str, ...] | None = None) -> dict:
        """Which outputs a forward computes (the UGD family: ``ugd.paradigms.ugd_paradigms``)."""
        needed = getattr(self.paradigm, "needed", None)
        if needed is None:
            raise NotImplementedError(f"paradigm {self.config.paradigm!r} does not report which outputs it computes")
        return needed(self, compute)

    def forward(self, batch: dict, *, compute: tuple[str, ...] | None = None) -> UGDOutput:
        """One packed batch (``ugd.data.collator``) -> UGDOutput with the loss, each term, and the outputs.

        In training mode the active loss terms decide what runs; ``compute`` adds outputs. The paradigm
        (``self.paradigm.forward``) does the work.
        """
        return self.paradigm.forward(self, move_batch(batch, self.head_device), compute)

    # ------------------------------------------------------------------ inference (docs/spec.md section 7)
    # Thin wrappers over ugd.serving.inference and ugd.serving.generate, which document the costs and the checks.

    def encode_queries(self, texts, **kwargs):
        """V_Q ``[N, H]`` of each query, encoded alone (``ugd.serving.inference.encode_texts``: ``batch_tokens``,
        ``show_progress``, ``output_device``, ``return_numpy``)."""
        return inference.encode_texts(self, texts, "query", **kwargs)

    def encode_documents(self, texts, **kwargs):
        """V_D ``[M, H]`` of each document, encoded alone (see ``encode_queries``); for a store that finds
        vectors by text and saves them, use ``ugd.DocumentVectors.build(model, texts)``."""
        return inference.encode_texts(self, texts, "document", **kwargs)

    def score_pairs(self, query_vectors, document_vectors) -> torch.Tensor:
        """Two-tower probabilities ``[N, C]`` of aligned stored vectors (no backbone)."""
        return inference.score_pairs(self, query_vectors, document_vectors)

    def score_documents(self, query_vectors, documents) -> torch.Tensor:
        """Two-tower probabilities ``[Nq, M, C]`` of queries against stored documents (no backbone)."""
        return inference.score_documents(self, query_vectors, documents)

    def predict(self, pairs, mode: str = "two_tower", **kwargs) -> torch.Tensor:
        """Class probabilities ``[N, C]`` of (query, document) pairs; ``mode`` "two_tower" or "single_tower"."""
        return inference.predict(self, pairs, mode, **kwargs)

    def rank(self, query: str, documents, top_k: int | None = 10, mode: str = "two_tower", **kwargs):
        """``[(index, score), ...]`` of the best ``top_k`` documents (texts or stored vectors) for ``query``."""
        return inference.rank(self, query, documents, top_k=top_k, mode=mode, **kwargs)

    def generate_reason(self, pairs, max_new_tokens: int = 64, do_sample: bool = False, **kwargs) -> list[str]:
        """The reason for each (query, document) pair: packed prefill, then batched cached decoding
        (``ugd.serving.generate.generate_reason_ids``: ``batch_size``, ``generate`` keywords)."""
        return generate.generate_reason(self, inference.tokenizer_of(self), pairs, max_new_tokens=max_new_tokens,
                                        do_sample=do_sample, **kwargs)
