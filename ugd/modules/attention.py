"""transformers integration: ``attn_implementation="ugd"`` runs partitioned attention (docs/spec.md section 3).

Importing this module registers, once:

* ``AttentionInterface.register("ugd", ugd_attention_forward)``: the function every decoder layer of
  a transformers model calls (``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation)``).
* ``AttentionMaskInterface.register("ugd", ugd_mask)``: the function ``create_causal_mask`` (and the
  sliding-window / bidirectional variants) call to build the mask for that implementation.

Packed path. ``model(input_ids=[1, T], position_ids=[1, T], cu_seqlens=..., kv_start=...,
kv_end=..., max_seqlen=..., use_cache=False)``: the four extra keywords travel through the
model's ``**kwargs`` (``Unpack[TransformersKwargs]``: a ``TypedDict`` hint, nothing filters it at
run time) from ``XForCausalLM.forward`` to ``XModel.forward`` to every decoder layer to the
attention module, which passes them on to the attention function. There the [1, H, T, D]
query/key/value (after RoPE) become [T, H, D] views and go to ``ugd_ops.partitioned_attention``.

Kernels. ``ugd_ops.partitioned_attention`` runs the compiled C++ kernel on the CPU; on CUDA the compiled
CUDA kernel where it serves, else FlexAttention with a block mask built once per batch (every layer
passes the same three layout tensors, so ``ugd_ops.flex`` builds it once), else the reference
(``python -m ugd_ops.info`` says which). Under ``torch.autocast`` q, k and v are cast to the autocast
dtype, as SDPA's are: an fp32 model under bf16 autocast hands over fp32 q/k (RoPE) and a bf16 v.

No T x T mask. ``create_causal_mask`` runs before any layer and cannot see the forward's
``**kwargs``; what it hands the mask function is only sizes, offsets, the 2D padding mask and a mask
*function* (it does detect restarting ``position_ids`` as packing, and would then build a
[1, 1, T, T] block-causal mask for sdpa/eager). ``ugd_mask`` therefore builds nothing when the call
could be a packed one (batch 1, as many keys as queries, no cache offset): it returns a
``DeferredMask`` that only records the arguments. The attention function ignores it on the packed
path, and otherwise builds it once (``sdpa_mask`` with exactly those arguments, memoised for the
following layers) and runs transformers' own ``sdpa_attention_forward``. Every other call (batch
> 1, decode steps with a KV cache, static caches) gets ``sdpa_mask``'s result directly. So without
packing metadata "ugd" is "sdpa", mask for mask, including padding masks for batched generation.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.utils import logging

import ugd_ops

__all__ = [
    "ATTN_IMPLEMENTATION",
    "PACKING_KWARGS",
    "DeferredMask",
    "register",
    "ugd_attention_forward",
    "ugd_mask",
]

ATTN_IMPLEMENTATION = "ugd"
# The forward keywords of the packed path; the first three are required together.
PACKING_KWARGS = ("cu_seqlens", "kv_start", "kv_end", "max_seqlen")
_REQUIRED = PACKING_KWARGS[:3]
_mask_interface_registered = False  # set by register(); False on transformers < 4.53



# ---------------------------------------------------------------------------------------------
# mask
# ---------------------------------------------------------------------------------------------


class DeferredMask:
    """The mask ``sdpa_mask`` would build for this forward, not built yet.

    The packed path drops it unseen; the ordinary path calls :meth:`materialize` (the first layer
    builds it, the others reuse it), so an unpacked forward costs what it costs under "sdpa".
    """

    __slots__ = ("_kwargs", "_mask", "_built")

    def __init__(self, mask_kwargs: dict):
        self._kwargs = mask_kwargs
        self._mask = None
        self._built = False

    def materialize(self) -> torch.Tensor | None:
        """The sdpa mask: a bool [B, 1, q, kv] tensor, or None where sdpa relies on ``is_causal``."""
        if not self._built:
            self._mask = sdpa_mask(**self._kwargs)
            self._built = True
            self._kwargs = None  # drop the references (position ids, padding mask) it held
        return self._mask

    def contiguous(self) -> torch.Tensor | None:
        # generate() calls .contiguous() on masks it builds ahead of the forward (compileable caches)
        mask = self.materialize()
        return mask.contiguous() if mask is not None else None

    @property
    def is_materialized(self) -> bool:
        return self._built

    def __repr__(self) -> str:
        return f"DeferredMask(materialized={self._built})"


def _is_zero(x) -> bool:
    # an int (or a SymInt under torch.compile); a tensor offset means a static cache: not packed
    return not isinstance(x, torch.Tensor) and x == 0


def _could_be_packed(batch_size, mask_kwargs: dict) -> bool:
    """Whether a packed forward could be behind this mask request: batch 1, as many keys as queries,
    nothing cached before them. Decided from sizes alone (no device sync)."""
    if batch_size != 1 or not _is_zero(mask_kwargs.get("kv_offset", 0)):
        return False
    kv_length = mask_kwargs.get("kv_length")
    if "q_length" in mask_kwargs:  # transformers 5.x
        return mask_kwargs["q_length"] == kv_length and _is_zero(mask_kwargs.get("q_offset", 0))
    cache_position = mask_kwargs.get("cache_position")  # transformers 4.x: the query positions
    return isinstance(cache_position, torch.Tensor) and cache_position.shape[0] == kv_length


def ugd_mask(batch_size: int, **mask_kwargs: Any):
    """The ``AttentionMaskInterface`` entry of "ugd".

    It receives sizes and offsets (``q_length``/``q_offset`` in transformers 5, ``cache_position`` in
    4.x), ``kv_length``/``kv_offset``, the 2D padding mask, a mask *function* and the config -- but
    no forward keywords, so it cannot know whether packing metadata is coming. A call that could be
    packed (batch 1, as many keys as queries, no offset) gets a :class:`DeferredMask`; any other gets
    exactly what ``sdpa_mask`` returns for the same arguments.
    """
    mask_kwargs["batch_size"] = batch_size
    if _could_be_packed(batch_size, mask_kwargs):
        return DeferredMask(mask_kwargs)
    return sdpa_mask(**mask_kwargs)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------


# The layout tensors each layer passes on, as converted for the kernels: [(weak reference to the given
# tensor, its version, device, converted tensor)], most recent first. Every layer of a forward gets
# the same objects, so a conversion (a [1, n] view, int64 -> int32, CPU -> GPU) happens once per
# forward and every layer hands ugd_ops the *same* tensors -- which is what lets ugd_ops.flex build
# its block mask once per batch.
_converted: list = []
_CONVERTED_SIZE = 6


def _index_tensor(t, name: str, device: torch.device) -> torch.Tensor:
    given = t if isinstance(t, torch.Tensor) and not torch.compiler.is_compiling() else None
    if given is not None:
        for ref, version, dev, out in _converted:
            if ref() is given and version == given._version and dev == device:
                return out
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f'attn_implementation="ugd": {name} must be an integer tensor, got {t.dtype}')
    if t.dim() == 2 and t.shape[0] == 1:  # [1, n] as collators sometimes batch it
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f'attn_implementation="ugd": {name} must be 1-D, got shape {list(t.shape)}')
    out = t.to(device=device, dtype=torch.int32)  # no copy when it already is int32 on this device
    if given is not None and out is not given:
        _converted.insert(0, (weakref.ref(given), given._version, device, out))
        del _converted[_CONVERTED_SIZE:]
    return out


def _packed_attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                      meta: dict, kwargs: dict):
    if query.dim() != 4:
        raise ValueError(f'attn_implementation="ugd": expected query [B, H, T, D], got shape {list(query.shape)}')
    batch, _, q_len, _ = query.shape
    if batch != 1:
        raise ValueError(
            f'attn_implementation="ugd": the packed path needs batch size 1 (all sequences concatenated into '
            f"input_ids [1, T], delimited by cu_seqlens), got batch size {batch}")
    if key.shape[2] != q_len:
        raise ValueError(
            f'attn_implementation="ugd": packing metadata was given but the keys hold {key.shape[2]} tokens for '
            f"{q_len} queries (a KV cache with earlier tokens). The packed path runs a whole packed batch from an "
            "empty cache; pass cu_seqlens/kv_start/kv_end only there (not to decode steps or generate())")
    if softcap is not None:
        raise NotImplementedError(
            f'attn_implementation="ugd": attention logit softcapping (softcap={softcap}) is not supported by '
            "partitioned attention")
    if dropout:
        raise NotImplementedError(
            f'attn_implementation="ugd": attention dropout ({dropout}) is not supported on the packed path; '
            "set config.attention_dropout = 0.0 (or call model.eval())")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(
            'attn_implementation="ugd": additive position bias is not supported on the packed path')
    if isinstance(attention_mask, torch.Tensor):
        if not _mask_interface_registered:
            raise RuntimeError(
                'attn_implementation="ugd": the packed path needs transformers >= 4.53 (AttentionMaskInterface); '
                "this version built a dense 4D mask before the attention")
        raise ValueError(
            f'attn_implementation="ugd": got both packing metadata and a {attention_mask.dim()}-D attention mask '
            f"tensor {list(attention_mask.shape)}; the layout comes from cu_seqlens/kv_start/kv_end alone, "
            "pass one or the other")

    device = query.device
    cu = _index_tensor(meta["cu_seqlens"], "cu_seqlens", device)
    ks = _index_tensor(meta["kv_start"], "kv_start", device)
    ke = _index_tensor(meta["kv_end"], "kv_end", device)
    max_seqlen = meta.get("max_seqlen")
    if isinstance(max_seqlen, torch.Tensor):
        max_seqlen = int(max_seqlen)
    if ks.shape[0] != q_len or ke.shape[0] != q_len:
        raise ValueError(
            f'attn_implementation="ugd": kv_start and kv_end must have one entry per token (T = {q_len}), '
            f"got {ks.shape[0]} and {ke.shape[0]}")
    if sliding_window is not None:
        # transformers' window keeps key j for query i iff i - j < window; with every sequence no longer
        # than the window that never drops anything (a Mistral config sets 4096 by default).
        longest = max_seqlen if max_seqlen is not None else int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        if longest > sliding_window:
            raise NotImplementedError(
                f'attn_implementation="ugd": sliding-window attention (window {sliding_window}) is not supported '
                f"on the packed path, and the longest sequence ({longest} tokens) is longer than the window")

    # [1, H, T, D] -> [T, H, D]: views (the kernel takes strides; only the last dim must be contiguous)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    q, k, v = (x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))  # never in practice
    out = ugd_ops.partitioned_attention(q, k, v, cu, ks, ke, max_seqlen=max_seqlen, softmax_scale=scaling)
    return out.unsqueeze(0), None  # [1, T, H, D], as sdpa_attention_forward returns; no weights


def ugd_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
):
    """The ``AttentionInterface`` entry of "ugd".

    Args:
        query: ``[B, Hq, T, D]``; key, value: ``[B, Hkv, S, D]`` (after RoPE and the cache update).
        attention_mask: what ``ugd_mask`` returned (a :class:`DeferredMask`, a bool mask or None), or
            a 4D mask the caller passed to the model.
        kwargs: the model's forward keywords. ``cu_seqlens``, ``kv_start``, ``kv_end`` (and optionally
            ``max_seqlen``) select the packed path.

    Returns:
        ``(attn_output [B, T, Hq, D], None)``.
    """
    meta = {name: kwargs.pop(name, None) for name in PACKING_KWARGS}
    given = [name for name in _REQUIRED if meta[name] is not None]
    if given and len(given) < len(_REQUIRED):
        missing = [name for name in _REQUIRED if meta[name] is None]
        raise ValueError(
            f'attn_implementation="ugd": packing metadata is partial: got {", ".join(given)} but not '
            f'{", ".join(missing)}; pass cu_seqlens, kv_start and kv_end together (max_seqlen optional)')
    if not given:
        if meta["max_seqlen"] is not None:
            raise ValueError(
                'attn_implementation="ugd": max_seqlen was given without cu_seqlens, kv_start and kv_end')
        # Ordinary causal attention: exactly what "sdpa" does, with the mask sdpa would have got.
        if isinstance(attention_mask, DeferredMask):
            attention_mask = attention_mask.materialize()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  sliding_window=sliding_window, softcap=softcap, **kwargs)
    if kwargs.get("output_attentions"):
        logging.get_logger(__name__).warning_once(
            'attn_implementation="ugd" returns no attention weights (output_attentions=True is ignored)')
    return _packed_attention(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                             meta, kwargs)


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


def register() -> None:
    """Registers "ugd" with transformers' attention and mask interfaces (idempotent).

    Raises ImportError without transformers. With transformers older than 4.53 (no
    ``AttentionMaskInterface``) only the attention function is registered and a warning says that
    the packed path is unavailable there (those versions build a dense 4D mask themselves).
    """
    global _mask_interface_registered
    if AttentionInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not ugd_attention_forward:
        AttentionInterface.register(ATTN_IMPLEMENTATION, ugd_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        import warnings

        warnings.warn('attn_implementation="ugd": this transformers version has no AttentionMaskInterface '
                      "(added in 4.53); the packed path needs transformers >= 4.53", stacklevel=2)
        return
    if AttentionMaskInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not ugd_mask:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ugd_mask)
    _mask_interface_registered = True


try:
    register()
except ImportError:  # transformers is an optional dependency: call register() once it is installed
    pass
