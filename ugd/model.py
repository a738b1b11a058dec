"""UGDModel: any Hugging Face causal LM, the partition mask, the heads and the losses of SPEC 5-6.

A checkpoint directory holds the backbone exactly as transformers saves it (so
``AutoModelForCausalLM.from_pretrained(path)`` still loads it), the tokenizer, ``ugd_config.json``
and ``ugd_heads.safetensors``; the `ttm` baseline keeps its document backbone in
``document_backbone/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

import ugd_ops

from .heads import UGDHeads
from .losses import TERM_WEIGHTS, classification_loss, distillation_loss, generation_loss

CONFIG_NAME = "ugd_config.json"
HEADS_NAME = "ugd_heads.safetensors"
DOCUMENT_BACKBONE_DIR = "document_backbone"

# Per paradigm (SPEC section 6): which towers exist and which loss terms it trains.
PARADIGM_TERMS = {
    "ugd-ttm": ("cls_t", "cls_s", "gen", "kl", "kl_emb"),
    "ugd-stm": ("cls_s", "gen"),
    "shared-ttm": ("cls_t",),
    "ttm": ("cls_t",),
    "stm": ("cls_s",),
}
TWO_TOWER = {"ugd-ttm", "shared-ttm", "ttm"}
SINGLE_TOWER = {"ugd-ttm", "ugd-stm", "stm"}
GENERATIVE = {"ugd-ttm", "ugd-stm"}


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
    layout: dict = field(default_factory=dict)  # ugd.layout.LayoutConfig as a dict
    special_token_ids: dict = field(default_factory=dict)  # {"cls", "gmask", "start", "eos"}

    def __post_init__(self):
        if self.paradigm not in PARADIGM_TERMS:
            raise ValueError(f"paradigm must be one of {sorted(PARADIGM_TERMS)}, got {self.paradigm!r}")
        if self.num_labels < 2:
            raise ValueError(f"num_labels must be >= 2, got {self.num_labels}")
        for name in ("alpha", "beta", "gamma", "lam", "mu"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be > 0, got {self.kl_temperature}")

    def weight(self, term: str) -> float:
        return float(getattr(self, TERM_WEIGHTS[term]))

    @property
    def active_terms(self) -> tuple[str, ...]:
        """The loss terms this paradigm trains with a non-zero weight."""
        return tuple(t for t in PARADIGM_TERMS[self.paradigm] if self.weight(t) != 0)

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


@dataclass
class UGDOutput:
    loss: torch.Tensor | None = None
    terms: dict = field(default_factory=dict)  # each weighted term's unweighted value
    logits_t: torch.Tensor | None = None  # [B, C] two-tower
    logits_s: torch.Tensor | None = None  # [B, C] single-tower
    v_q: torch.Tensor | None = None
    v_d: torch.Tensor | None = None
    v_s: torch.Tensor | None = None


def move_batch(batch, device):
    """A collated batch (nested dicts of tensors and ints) on ``device``."""
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def _gather(hidden: torch.Tensor, index: torch.Tensor, what: str) -> torch.Tensor:
    if bool((index < 0).any()):
        raise ValueError(f"the batch has samples without a {what} [CLS] (span length 0); this paradigm needs it")
    return hidden[index]


def packed_inputs(backbone: nn.Module, pack: dict) -> dict:
    """The keywords that run a packed batch (``ugd.collator.pack``) through ``backbone``.

    With ``attn_implementation="ugd"``: ids, positions and the packing metadata (partitioned attention,
    no T x T mask). Any other implementation (eager, sdpa) gets the same layout as a dense additive
    4D mask: the reference path, O(T^2) memory, for checks and comparisons only.
    """
    kwargs = dict(input_ids=pack["input_ids"], position_ids=pack["position_ids"])
    if backbone.config._attn_implementation == "ugd":
        kwargs.update(cu_seqlens=pack["cu_seqlens"], kv_start=pack["kv_start"], kv_end=pack["kv_end"],
                      max_seqlen=pack["max_seqlen"])
    else:
        allowed = ugd_ops.dense_mask(pack["cu_seqlens"], pack["kv_start"], pack["kv_end"])
        dtype = backbone.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        kwargs["attention_mask"] = mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]
    return kwargs


class UGDModel(nn.Module):
    """A UGD matcher on a causal-LM backbone loaded with ``attn_implementation="ugd"``."""

    def __init__(self, backbone: nn.Module, config: UGDConfig, document_backbone: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        p = config.paradigm
        if p == "ttm" and document_backbone is None:
            raise ValueError("the 'ttm' baseline needs a second backbone for documents (document_backbone=...)")
        self.document_backbone = document_backbone
        self.tokenizer = None  # set by from_backbone / from_pretrained; the inference methods use it
        self._heads_digest = None  # (sha256 of the heads file it was loaded from, parameter versions then)
        hidden = backbone.config.get_text_config().hidden_size
        self.heads = UGDHeads(hidden, config.num_labels, config.kl_dim, two_tower=p in TWO_TOWER,
                              single_tower=p in SINGLE_TOWER, activation=config.head_activation)

    # ------------------------------------------------------------------ construction and storage

    @classmethod
    def from_backbone(cls, backbone, tokenizer, config: UGDConfig | None = None, **overrides) -> "UGDModel":
        """Wraps a causal LM (a model, or a local path for AutoModelForCausalLM) for UGD: adds the
        special tokens to ``tokenizer`` and resizes the embeddings."""
        from transformers import AutoModelForCausalLM

        from . import attention  # noqa: F401  registers attn_implementation="ugd"
        from .layout import add_special_tokens

        config = dataclasses.replace(config or UGDConfig(), **overrides)
        if isinstance(backbone, (str, os.PathLike)):
            path = backbone
            backbone = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ugd")
            document = (AutoModelForCausalLM.from_pretrained(path, attn_implementation="ugd")
                        if config.paradigm == "ttm" else None)
        else:
            backbone.set_attn_implementation("ugd")
            document = None
            if config.paradigm == "ttm":
                import copy

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
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        self.backbone.save_pretrained(path, **kwargs)
        if self.document_backbone is not None:
            self.document_backbone.save_pretrained(os.path.join(path, DOCUMENT_BACKBONE_DIR), **kwargs)
        save_file(self._heads_state(), os.path.join(path, HEADS_NAME))
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def _heads_state(self) -> dict:
        return {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}

    def _heads_versions(self) -> tuple:
        # which tensors the heads hold and how often each was written in place (an optimizer step, a
        # load_state_dict); .to(dtype/device) keeps both, so a dtype change keeps the name
        return tuple((id(p), p._version) for p in self.heads.parameters())

    def fingerprint(self) -> str:
        """A name for these weights, for data derived from them (stored document vectors).

        The sha256 of the heads' safetensors serialization: of the file a checkpoint was loaded from
        (so loading it in another dtype keeps the name), otherwise of the heads as they are now (equal to
        the file ``save_pretrained`` would write). Remembered until a head parameter is written in place
        or replaced, so calling it per request costs nothing. The heads are trained with the backbone, so a
        different checkpoint of the same run has different heads.
        """
        import hashlib

        versions = self._heads_versions()
        if self._heads_digest is not None and self._heads_digest[1] == versions:
            return self._heads_digest[0]
        from safetensors.torch import save

        digest = hashlib.sha256(save(self._heads_state())).hexdigest()
        self._heads_digest = (digest, versions)  # computed once until the heads change
        return digest

    @classmethod
    def from_pretrained(cls, path: str, tokenizer=None, **backbone_kwargs) -> "UGDModel":
        """Loads a checkpoint written by ``save_pretrained`` (or by ``python -m ugd.train``).

        ``tokenizer``: default, the one saved in ``path`` (if any; the inference methods need one).
        ``backbone_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...;
        ``attn_implementation`` defaults to "ugd").
        """
        import hashlib

        from safetensors.torch import load
        from transformers import AutoModelForCausalLM

        from . import attention  # noqa: F401
        from .layout import load_tokenizer

        cfg_file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{path} is not a UGD checkpoint: {CONFIG_NAME} is missing "
                                    "(to start from a plain causal LM, use UGDModel.from_backbone)")
        with open(cfg_file) as f:
            config = UGDConfig.from_dict(json.load(f))
        backbone_kwargs.setdefault("attn_implementation", "ugd")
        backbone = AutoModelForCausalLM.from_pretrained(path, **backbone_kwargs)
        document = None
        if config.paradigm == "ttm":
            document = AutoModelForCausalLM.from_pretrained(os.path.join(path, DOCUMENT_BACKBONE_DIR),
                                                            **backbone_kwargs)
        model = cls(backbone, config, document)
        with open(os.path.join(path, HEADS_NAME), "rb") as f:
            heads_bytes = f.read()
        model.heads.load_state_dict(load(heads_bytes))
        first = next(backbone.parameters())
        model = model.to(first.dtype)
        model.heads.to(first.device)  # with device_map the backbone is already placed; the heads follow it
        model._heads_digest = (hashlib.sha256(heads_bytes).hexdigest(), model._heads_versions())
        if tokenizer is None and any(os.path.isfile(os.path.join(path, f))
                                     for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = load_tokenizer(path)
        model.tokenizer = tokenizer
        return model

    # ------------------------------------------------------------------ forward

    def encode(self, pack: dict, *, backbone: nn.Module | None = None) -> torch.Tensor:
        """Last hidden states [T, H] (after the backbone's final norm) of a packed batch.

        With ``attn_implementation="ugd"`` the layout goes to the partitioned-attention kernels. Any
        other implementation (eager, sdpa) gets the same layout as a dense additive 4D mask: the
        reference path, O(T^2) memory, for checks and comparisons only.
        """
        backbone = backbone or self.backbone
        return backbone.get_decoder()(**packed_inputs(backbone, pack), use_cache=False).last_hidden_state[0]

    def _training_terms(self, compute) -> set:
        """The loss terms a forward computes: the active ones, unless an eval call asked for outputs."""
        return set(self.config.active_terms) if self.training or compute is None else set()

    def needed(self, compute: tuple[str, ...] | None = None) -> dict:
        """Which outputs to compute: those the active loss terms need, plus ``compute`` (any of
        "two_tower", "single_tower", "gen")."""
        terms = self._training_terms(compute)
        want = set(compute or ())
        p = self.config.paradigm
        need = {
            "logits_t": bool(terms & {"cls_t", "kl"}) or "two_tower" in want,
            "logits_s": bool(terms & {"cls_s", "kl"}) or "single_tower" in want,
            "emb": "kl_emb" in terms,
            "gen": "gen" in terms or "gen" in want,
        }
        if need["logits_t"] and p not in TWO_TOWER:
            raise ValueError(f"paradigm {p!r} has no two-tower head")
        if need["logits_s"] and p not in SINGLE_TOWER:
            raise ValueError(f"paradigm {p!r} has no single-tower head")
        need["v_qd"] = need["logits_t"] or need["emb"]
        need["v_s"] = need["logits_s"] or need["emb"]
        return need

    def forward(self, batch: dict, *, compute: tuple[str, ...] | None = None) -> UGDOutput:
        """One packed batch (``ugd.collator``) -> UGDOutput with the loss, each term, and the outputs.

        In training mode the active loss terms decide what runs; ``compute`` adds outputs.
        """
        cfg, heads = self.config, self.heads
        batch = move_batch(batch, self.heads.classifier.weight.device)
        need = self.needed(compute)
        out = UGDOutput()
        if cfg.paradigm == "ttm":
            out.v_q = _gather(self.encode(batch["query"]), batch["query"]["cls_index"][:, 0], "query")
            out.v_d = _gather(self.encode(batch["document"], backbone=self.document_backbone),
                              batch["document"]["cls_index"][:, 1], "document")
            labels = batch["labels"]
            hidden = None
        else:
            hidden = self.encode(batch)
            cls_index = batch["cls_index"]
            labels = batch["labels"]
            if need["v_qd"]:
                out.v_q = _gather(hidden, cls_index[:, 0], "query")
                out.v_d = _gather(hidden, cls_index[:, 1], "document")
            if need["v_s"]:
                out.v_s = _gather(hidden, cls_index[:, 2], "single-tower")
        f_t = heads.two_tower_features(out.v_q, out.v_d) if (need["logits_t"] or need["emb"]) else None
        if need["logits_t"]:
            out.logits_t = heads.classifier(f_t)
        if need["logits_s"]:
            out.logits_s = heads.classifier(out.v_s)

        terms = {}
        have_labels = labels is not None and bool((labels != -100).any())
        active = self._training_terms(compute)
        if "cls_t" in active and have_labels:
            terms["cls_t"] = classification_loss(out.logits_t, labels)
        if "cls_s" in active and have_labels:
            terms["cls_s"] = classification_loss(out.logits_s, labels)
        if "gen" in active and hidden is not None and "lm_labels" in batch:
            terms["gen"] = generation_loss(hidden, self.backbone.get_output_embeddings(), batch["lm_labels"][0],
                                           batch["cu_seqlens"])
        if "kl" in active:
            terms["kl"] = distillation_loss(out.logits_t, out.logits_s, temperature=cfg.kl_temperature,
                                            detach=cfg.detach)
        if "kl_emb" in active:
            terms["kl_emb"] = distillation_loss(heads.fc_t_kl(f_t), heads.fc_s_kl(out.v_s),
                                                temperature=cfg.kl_temperature, detach=cfg.detach)
        out.terms = terms
        if terms:
            out.loss = sum(cfg.weight(t) * v for t, v in terms.items())
        return out

    # ------------------------------------------------------------------ inference (SPEC section 7)
    # Thin wrappers over ugd.inference and ugd.generate, which document the costs and the checks.

    def encode_queries(self, texts, **kwargs):
        """V_Q ``[N, H]`` of each query, encoded alone (``ugd.inference.encode_texts``: ``batch_tokens``,
        ``show_progress``, ``output_device``, ``return_numpy``)."""
        from .inference import encode_texts

        return encode_texts(self, texts, "query", **kwargs)

    def encode_documents(self, texts, **kwargs):
        """V_D ``[M, H]`` of each document, encoded alone (see ``encode_queries``); for a store that finds
        vectors by text and saves them, use ``ugd.DocumentVectors.build(model, texts)``."""
        from .inference import encode_texts

        return encode_texts(self, texts, "document", **kwargs)

    def score_pairs(self, query_vectors, document_vectors) -> torch.Tensor:
        """Two-tower probabilities ``[N, C]`` of aligned stored vectors (no backbone)."""
        from .inference import score_pairs

        return score_pairs(self, query_vectors, document_vectors)

    def score_documents(self, query_vectors, documents) -> torch.Tensor:
        """Two-tower probabilities ``[Nq, M, C]`` of queries against stored documents (no backbone)."""
        from .inference import score_documents

        return score_documents(self, query_vectors, documents)

    def predict(self, pairs, mode: str = "two_tower", **kwargs) -> torch.Tensor:
        """Class probabilities ``[N, C]`` of (query, document) pairs; ``mode`` "two_tower" or "single_tower"."""
        from .inference import predict

        return predict(self, pairs, mode, **kwargs)

    def rank(self, query: str, documents, top_k: int | None = 10, mode: str = "two_tower", **kwargs):
        """``[(index, score), ...]`` of the best ``top_k`` documents (texts or stored vectors) for ``query``."""
        from .inference import rank

        return rank(self, query, documents, top_k=top_k, mode=mode, **kwargs)

    def generate_reason(self, pairs, max_new_tokens: int = 64, do_sample: bool = False, **kwargs) -> list[str]:
        """The reason for each (query, document) pair: packed prefill, then batched cached decoding
        (``ugd.generate.generate_reason_ids``: ``batch_size``, ``generate`` keywords)."""
        from .generate import generate_reason
        from .inference import tokenizer_of

        return generate_reason(self, tokenizer_of(self), pairs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                               **kwargs)
