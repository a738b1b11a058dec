"""``UGDModel.fingerprint()``: a name for everything that determines the document vectors V_D.

Stored document vectors (``ugd.serving.doc_vectors``) are only right for the model that made them, so they
carry its fingerprint and a model with another one is refused. V_D depends on the backbone weights,
the backbone's configuration (layers, rotary settings, ...), the UGD configuration (special token
ids, layout, paradigm options) and, for scoring, the heads. The fingerprint is the SHA-256 of

* the UGD config, without the loss weights (they change training, not a trained model's outputs);
* the backbone config, without fields that name where or how it was loaded (dtype, path, attention);
* the heads' safetensors serialization (as before: of the file a checkpoint was loaded from);
* each backbone's weights: the sorted SHA-256 digests of its tensors' bytes as saved (dtype and shape
  included). A checkpoint's are read from its safetensors files (so loading it in bf16 keeps the
  name); a model built or changed in memory hashes its tensors as they are. Tied weights (one tensor
  under two names, saved once) count once, and names are left out, so the file and the in-memory
  model agree whatever names transformers saves them under.

The expensive parts (backbone and heads digests) are remembered per model until a parameter is
written in place or replaced (``Tensor._version`` and identity), so calling it per request is cheap.
Hashing a 3 GB backbone file costs a few seconds, once per loaded model, and only when a store is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import torch
from safetensors.torch import save

from .checkpoint import DOCUMENT_BACKBONE_DIR, backbone_weight_files

# UGDConfig fields that do not change what a trained model computes
TRAINING_ONLY_FIELDS = ("alpha", "beta", "gamma", "lam", "mu", "detach", "kl_temperature")
# backbone config fields that say where or how a checkpoint was loaded, not what it computes
VOLATILE_BACKBONE_FIELDS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                            "_attn_implementation", "attn_implementation", "_attn_implementation_autoset",
                            "use_cache", "output_attentions", "output_hidden_states", "return_dict",
                            "_commit_hash", "_experts_implementation")
CHUNK = 1 << 24

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _entry(dtype: str, shape, digest: str) -> str:
    return f"{dtype}{list(shape)}:{digest}"


def _file_tensor_entries(path: str) -> list[str]:
    """One entry per tensor of a safetensors file, hashing its bytes straight from the file."""
    entries = []
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            f.seek(base + begin)
            h = hashlib.sha256()
            left = end - begin
            while left:
                block = f.read(min(CHUNK, left))
                if not block:
                    raise ValueError(f"{path} is truncated")
                h.update(block)
                left -= len(block)
            entries.append(_entry(info["dtype"], info["shape"], h.hexdigest()))
    return entries


def _memory_tensor_entries(module: torch.nn.Module) -> list[str]:
    entries, seen = [], set()
    for t in module.state_dict(keep_vars=False).values():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in seen:  # tied: one tensor under two names, saved once
            continue
        seen.add(key)
        data = t.detach().contiguous().cpu()
        raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        entries.append(_entry(_SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)), t.shape, hashlib.sha256(raw).hexdigest()))
    return entries


def _versions(module: torch.nn.Module | None) -> tuple:
    return () if module is None else tuple((id(p), p._version) for p in module.parameters())


def _weights_digest(entries: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(set(entries))).encode()).hexdigest()


def note_checkpoint_files(model, path: str) -> None:
    """Called by ``from_pretrained``: the backbone weights are those of the safetensors files in ``path``
    (hashed lazily, on the first ``fingerprint()``), as long as no parameter changes."""
    files = {"backbone": backbone_weight_files(path)}
    if model.document_backbone is not None:
        files["document_backbone"] = backbone_weight_files(os.path.join(path, DOCUMENT_BACKBONE_DIR))
    model._ugd_weight_files = {k: (v, _versions(getattr(model, k))) for k, v in files.items() if v}


def _backbone_digest(model, attr: str) -> str:
    module = getattr(model, attr)
    versions = _versions(module)
    memo = getattr(model, "_ugd_weight_digests", None)
    if memo is None:
        memo = model._ugd_weight_digests = {}
    if attr in memo and memo[attr][1] == versions:
        return memo[attr][0]
    files = getattr(model, "_ugd_weight_files", {}).get(attr)
    if files is not None and files[1] == versions:  # still the weights of the checkpoint's files
        entries = [e for path in files[0] for e in _file_tensor_entries(path)]
    else:
        entries = _memory_tensor_entries(module)
    digest = _weights_digest(entries)
    memo[attr] = (digest, versions)
    return digest


def heads_digest(model) -> str:
    """SHA-256 of the heads' safetensors serialization (of the file they were loaded from, if unchanged)."""
    versions = model._heads_versions()
    if model._heads_digest is not None and model._heads_digest[1] == versions:
        return model._heads_digest[0]

    digest = hashlib.sha256(save(model._heads_state())).hexdigest()
    model._heads_digest = (digest, versions)  # computed once until the heads change
    return digest


def _backbone_config(module) -> dict:
    # the config's attributes as set (what to_dict serializes, without its deep copies: this runs per
    # call); private attributes are how it was loaded (attention implementation, hub commit), not what
    # it computes
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    d = {k: v for k, v in vars(cfg).items() if not k.startswith("_") and k not in VOLATILE_BACKBONE_FIELDS}
    d["model_type"] = getattr(cfg, "model_type", None)  # a class attribute, in vars() only once loaded
    return d


def model_fingerprint(model) -> str:
    """The fingerprint of a ``UGDModel`` (see the module docstring)."""
    ugd_config = {k: v for k, v in vars(model.config).items() if k not in TRAINING_ONLY_FIELDS}
    parts = {
        "ugd_config": ugd_config,
        "heads": heads_digest(model),
        "backbone": _backbone_digest(model, "backbone"),
        "backbone_config": _backbone_config(model.backbone),
    }
    if model.document_backbone is not None:
        parts["document_backbone"] = _backbone_digest(model, "document_backbone")
        parts["document_backbone_config"] = _backbone_config(model.document_backbone)
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["heads_digest", "model_fingerprint", "note_checkpoint_files"]
