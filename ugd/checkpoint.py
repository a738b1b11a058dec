"""The UGD checkpoint format: its file names, its one writer, its one reader, and the checks of its files.

A UGD checkpoint is a folder::

    config.json, model.safetensors (or shards + model.safetensors.index.json)   the backbone (transformers)
    document_backbone/                    the second backbone (two-backbone paradigms: the ttm baseline)
    lora_adapter/                         a LoRA run's adapters (for resuming; the backbone is saved merged)
    ugd_heads.safetensors                 the paradigm's heads
    ugd_config.json                       UGDConfig
    tokenizer.json, tokenizer_config.json the tokenizer (with the UGD special tokens)

``write_checkpoint`` writes it (``UGDModel.save_pretrained`` and the Trainer's saves call it);
``read_config``, ``load_backbones``, ``read_heads``, ``read_tokenizer`` and ``load_backbone_weights`` read
it (``UGDModel.from_pretrained``; resuming). This module does not import the model: it is handed the
backbones, the heads' state and the config as a dict.

Checks of a checkpoint's files before they are loaded: one clear error naming the file.

A missing, empty or truncated ``model.safetensors`` (or shard) or ``ugd_heads.safetensors`` would
otherwise surface as safetensors' ``incomplete metadata`` traceback, and a tokenizer whose
``tokenizer.json`` is missing loads as an empty tokenizer that encodes every text as ``[]``: every
prediction silently wrong. ``check_checkpoint_files`` is called by ``UGDModel.from_pretrained`` and
before training resumes from a checkpoint; ``check_tokenizer`` after a saved tokenizer is loaded.

The safetensors check reads only the header (8-byte length, JSON) and the file size, so it costs
nothing next to the load: a file whose tensors end before or after the end of the file is truncated
(or padded), a header that does not parse is damaged. Bytes overwritten inside the tensor data are
not seen here; the non-finite outputs they cause are refused where the outputs are made.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

from safetensors.torch import load, load_file, save_file
from transformers import AutoModelForCausalLM

from ._files import give_ordinary_modes
from .data.layout import SPECIAL_TOKENS, load_tokenizer

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
BACKBONE_CONFIG_NAME = "config.json"
# files a tokenizer can be rebuilt from besides tokenizer.json (slow tokenizers' vocabularies)
VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt",
               "sentencepiece.bpe.model")
CONFIG_NAME = "ugd_config.json"
HEADS_NAME = "ugd_heads.safetensors"
DOCUMENT_BACKBONE_DIR = "document_backbone"
LORA_ADAPTER_DIR = "lora_adapter"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, empty, truncated or unreadable; the message names it."""


REMEDY = "use another checkpoint or save this one again"


def check_safetensors_file(path: str, what: str = "weights", remedy: str = REMEDY) -> None:
    """Raises ``CheckpointFileError`` naming ``path`` (holding ``what``) unless it is a complete safetensors file;
    ``remedy`` ends the message (what to do about it)."""
    if not os.path.isfile(path):
        raise CheckpointFileError(f"{path} is missing (the {what}); a UGD checkpoint holds it beside ugd_config.json")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFileError(f"{path} is empty (0 bytes): the save that wrote it did not finish; {remedy}")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _truncated(path, size, remedy=remedy)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise _truncated(path, size, remedy=remedy)
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
            raise CheckpointFileError(f"{path} is damaged: its safetensors header does not parse; {remedy}") from None
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise _truncated(path, size, expected, remedy=remedy)


def _truncated(path: str, size: int, expected: int | None = None, *, remedy: str = REMEDY) -> CheckpointFileError:
    what = f"{size} bytes, its header describes {expected}" if expected is not None else f"{size} bytes"
    return CheckpointFileError(f"{path} is truncated or damaged ({what}): the save that wrote it did not finish, or "
                               f"the file was cut; {remedy}")


def backbone_weight_files(folder: str) -> list[str] | None:
    """The safetensors files of a transformers model folder (single file or the shards of the index),
    checked; None when the folder has no safetensors weights (another format: transformers reports it)."""
    single = os.path.join(folder, WEIGHTS_NAME)
    index = os.path.join(folder, WEIGHTS_INDEX_NAME)
    if os.path.exists(single):
        check_safetensors_file(single, "backbone's weights")
        return [single]
    if os.path.exists(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointFileError(f"{index} is damaged ({e.__class__.__name__}: {e})") from None
        files = [os.path.join(folder, s) for s in shards]
        for file in files:
            check_safetensors_file(file, "backbone's weights")
        return files
    return None


def check_backbone_folder(folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, BACKBONE_CONFIG_NAME)):
        raise CheckpointFileError(f"{os.path.join(folder, BACKBONE_CONFIG_NAME)} is missing (the backbone's config)")
    if backbone_weight_files(folder) is None and not any(
            os.path.isfile(os.path.join(folder, n)) for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise CheckpointFileError(f"{os.path.join(folder, WEIGHTS_NAME)} is missing (the backbone's weights; no "
                                  f"{WEIGHTS_INDEX_NAME} either)")


def check_checkpoint_files(path: str, *, document_backbone: bool = False, lora_adapter: str | None = None) -> None:
    """Every weight file a UGD checkpoint needs is there and complete: the backbone (unless
    ``lora_adapter`` names the adapter folder that replaces it), the heads, and with
    ``document_backbone`` (the ``ttm`` baseline) the second backbone. Raises ``CheckpointFileError``
    naming the first bad file."""
    if lora_adapter is not None:
        check_safetensors_file(os.path.join(lora_adapter, "adapter_model.safetensors"), "LoRA adapter")
    else:
        check_backbone_folder(path)
        if document_backbone:
            check_backbone_folder(os.path.join(path, DOCUMENT_BACKBONE_DIR))
    check_safetensors_file(os.path.join(path, HEADS_NAME), "UGD heads")


def has_tokenizer_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def load_checked_tokenizer(path: str, special_token_ids: dict | None = None):
    """The tokenizer saved in ``path`` (``ugd.data.layout.load_tokenizer``), refused with a
    ``CheckpointFileError`` naming the file when it cannot serve this checkpoint (see ``check_tokenizer``)."""
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")) and not any(
            os.path.isfile(os.path.join(path, f)) for f in VOCAB_FILES):
        raise CheckpointFileError(f"{os.path.join(path, 'tokenizer.json')} is missing: the checkpoint's tokenizer "
                                  "cannot be loaded without its vocabulary (copy it from the checkpoint it was "
                                  "trained with)")
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:  # tokenizers/transformers raise many types for a damaged file
        raise CheckpointFileError(f"the tokenizer in {path} cannot be loaded (tokenizer.json / tokenizer_config.json: "
                                  f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    check_tokenizer(tokenizer, path, special_token_ids)
    return tokenizer


def check_tokenizer(tokenizer, path: str, special_token_ids: dict | None = None) -> None:
    """The tokenizer maps UGD's special tokens to the ids the model was trained with (``ugd_config.json``'s
    ``special_token_ids``) and encodes text to something: an empty or foreign vocabulary would make every
    prediction silently wrong."""
    file = os.path.join(path, "tokenizer.json")
    for key, want in (special_token_ids or {}).items():
        token = SPECIAL_TOKENS.get(key)
        got = tokenizer.eos_token_id if key == "eos" else tokenizer.convert_tokens_to_ids(token) if token else None
        if got is not None and int(got) != int(want):
            raise CheckpointFileError(
                f"{file}: the tokenizer does not belong to this checkpoint ({token or 'eos'} is id {got} in it, "
                f"{want} in ugd_config.json); restore the tokenizer the model was trained with")
    probe = "hello world 1 2 3"
    if not tokenizer(probe, add_special_tokens=False)["input_ids"]:
        raise CheckpointFileError(f"{file}: the tokenizer encodes text to no tokens at all (an empty vocabulary); "
                                  "restore the tokenizer the model was trained with")


# ---------------------------------------------------------------------------------------------
# the writer
# ---------------------------------------------------------------------------------------------


def _save_backbone(backbone, folder: str, state_dict: dict | None, save_kwargs: dict) -> None:
    if state_dict is None:
        backbone.save_pretrained(folder, **save_kwargs)
    else:
        backbone.save_pretrained(folder, state_dict=state_dict, **save_kwargs)


def write_checkpoint(path: str, *, backbone, config: dict, heads_state: dict, document_backbone=None,
                     tokenizer=None, backbone_state: dict | None = None, document_state: dict | None = None,
                     lora_adapter=None, save_kwargs: dict | None = None) -> None:
    """Writes a UGD checkpoint to ``path`` (created if needed).

    ``backbone`` (and ``document_backbone``) are saved with their ``save_pretrained`` (``save_kwargs``
    go to it), with ``backbone_state`` / ``document_state`` as their ``state_dict`` when given (a state dict
    handed over by FSDP/DeepSpeed, or a LoRA backbone's merged weights); ``lora_adapter``: a peft model
    whose adapters go to ``lora_adapter/``. ``heads_state``: the heads' state dict (saved on the CPU);
    ``config``: ``UGDConfig.to_dict()``; ``tokenizer``: saved beside them when given. safetensors creates
    its files private (0600): they get the mode of any new file (``ugd._files.give_ordinary_modes``).
    """
    save_kwargs = save_kwargs or {}
    os.makedirs(path, exist_ok=True)
    _save_backbone(backbone, path, backbone_state, save_kwargs)
    if document_backbone is not None:
        _save_backbone(document_backbone, os.path.join(path, DOCUMENT_BACKBONE_DIR), document_state, save_kwargs)
    if lora_adapter is not None:
        lora_adapter.save_pretrained(os.path.join(path, LORA_ADAPTER_DIR))
    save_file({k: v.detach().contiguous().cpu() for k, v in heads_state.items()}, os.path.join(path, HEADS_NAME))
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    give_ordinary_modes(path)


# ---------------------------------------------------------------------------------------------
# the reader
# ---------------------------------------------------------------------------------------------


def read_config(path: str) -> dict:
    """``ugd_config.json`` of the checkpoint ``path`` as a dict; FileNotFoundError when it is missing."""
    cfg_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path} is not a UGD checkpoint: {CONFIG_NAME} is missing "
                                "(to start from a plain causal LM, use UGDModel.from_backbone)")
    with open(cfg_file) as f:
        return json.load(f)


def load_backbones(path: str, *, two_backbones: bool = False, **backbone_kwargs):
    """(backbone, document backbone or None) of the checkpoint ``path``, loaded with
    ``AutoModelForCausalLM.from_pretrained(..., **backbone_kwargs)``; the files are checked first."""
    # one error naming a missing/empty/truncated weight file, instead of safetensors' traceback
    check_checkpoint_files(path, document_backbone=two_backbones)
    backbone = AutoModelForCausalLM.from_pretrained(path, **backbone_kwargs)
    document = None
    if two_backbones:
        document = AutoModelForCausalLM.from_pretrained(os.path.join(path, DOCUMENT_BACKBONE_DIR), **backbone_kwargs)
    return backbone, document


def read_heads(path: str) -> tuple[dict, str]:
    """(the heads' state dict, the SHA-256 of ``ugd_heads.safetensors``) of the checkpoint ``path``."""
    with open(os.path.join(path, HEADS_NAME), "rb") as f:
        heads_bytes = f.read()
    return load(heads_bytes), hashlib.sha256(heads_bytes).hexdigest()


def read_tokenizer(path: str, special_token_ids: dict | None = None):
    """The tokenizer saved in the checkpoint ``path`` (checked: ``load_checked_tokenizer``), or None
    when it holds none."""
    if not has_tokenizer_files(path):
        return None
    # refused (naming the file) when it cannot serve the checkpoint, e.g. tokenizer.json missing
    return load_checked_tokenizer(path, special_token_ids)


def read_backbone_state(folder: str) -> dict | None:
    """The tensors of a transformers checkpoint folder (single or sharded safetensors), or None."""
    single = os.path.join(folder, WEIGHTS_NAME)
    index = os.path.join(folder, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(load_file(os.path.join(folder, name)))
        return state
    return None


def load_backbone_weights(backbone, folder: str) -> None:
    """Loads the backbone weights saved in ``folder`` into ``backbone`` in place (same architecture)."""
    state = read_backbone_state(folder)
    if state is None:
        raise FileNotFoundError(f"{folder}: no model.safetensors (or sharded index) to resume from")
    result = backbone.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{folder}: weights not in the model: {result.unexpected_keys[:5]}")
    # a key missing from the file is fine only when it is tied to one the file has (lm_head <-> embeddings)
    params = dict(backbone.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in result.missing_keys if not (k in params and id(params[k]) in loaded)]
    if missing:
        raise ValueError(f"{folder}: weights missing from the checkpoint: {missing[:5]}")


__all__ = ["CONFIG_NAME", "DOCUMENT_BACKBONE_DIR", "HEADS_NAME", "LORA_ADAPTER_DIR", "CheckpointFileError",
           "backbone_weight_files", "check_checkpoint_files", "check_safetensors_file", "check_tokenizer",
           "has_tokenizer_files", "load_backbone_weights", "load_backbones", "load_checked_tokenizer",
           "read_backbone_state", "read_config", "read_heads", "read_tokenizer", "write_checkpoint"]
