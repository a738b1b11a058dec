"""Draws the attention partition of a real tokenized sample, like Figure 2 of the UGD paper.

    python -m ugd.viz --output partition.png
    python -m ugd.viz --query "..." --document "..." --reason "..." --paradigm ugd-stm --output stm.png
    python -m ugd.viz --tokenizer /path/to/local/tokenizer --output partition.png

The mask is not drawn by hand: the sample goes through ``ugd.data.layout.encode_sample`` and
``ugd.data.packing.pack`` and the picture is ``ugd_ops.dense_mask`` of the packed batch's
``cu_seqlens, kv_start, kv_end`` (from ``ugd_ops.row_intervals``). Row i, column j is coloured when
token i may attend to token j, by the span of row i: Q green, D purple, P (prompt and the
single-tower ``[CLS]``) orange, G (reason) yellow; masked cells are grey. Allowed cells where a Q or
D row reads another span (the single-tower mask) are drawn in a lighter shade of the row's colour.

Without ``--tokenizer`` the offline test tokenizer of ``ugd.testing`` is used (trained on the sample
itself, so every word is one token).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from transformers import AutoTokenizer

import ugd_ops

from . import paradigms
from .paradigms import Paradigm
from .data.layout import SPECIAL_TOKENS, LayoutConfig, add_special_tokens, encode_sample
from .data.packing import pack
from .testing import make_test_tokenizer

EXAMPLE = {
    "query": "how do I reset my online banking password",
    "document": "what should I do if I forgot the password of my bank account",
    "reason": "both ask how to recover a forgotten password",
}

SPAN_NAMES = ("Q", "D", "P", "G")
SPAN_COLORS = {  # RGB in [0, 1]
    "Q": (0.36, 0.72, 0.36),  # green
    "D": (0.56, 0.40, 0.74),  # purple
    "P": (0.96, 0.60, 0.20),  # orange
    "G": (0.97, 0.83, 0.25),  # yellow
}
MASKED_COLOR = (0.88, 0.88, 0.88)  # grey
SPAN_LABELS = {
    "Q": "Q rows: query + [CLS] (V_Q)",
    "D": "D rows: document + [CLS] (V_D)",
    "P": "P rows: prompt + [CLS] (V_s)",
    "G": "G rows: [Start] + reason (causal)",
}


def _lighten(rgb, amount=0.55):
    return tuple(c + (1.0 - c) * amount for c in rgb)


def _display_token(tok: str) -> str:
    """Token string for a tick label: byte-level / sentencepiece word markers removed."""
    shown = tok.replace("\u0120", "").replace("\u2581", "").replace("\u010a", "\\n")
    return shown if shown.strip() else "\u2423"  # a visible space for whitespace-only tokens


def partition(tokenizer, query: str, document: str, reason: str | None = None, *, paradigm: str | Paradigm = "ugd-ttm",
              config: LayoutConfig | None = None) -> dict:
    """Encodes and packs one sample the way training does; returns what the figure shows.

    The UGD special tokens are added to ``tokenizer`` if it lacks them (as ``add_special_tokens`` does).

    Returns a dict: ``tokens`` (list[str], T), ``span_of`` (list of "Q"/"D"/"P"/"G", T), ``mask``
    (bool tensor [T, T] = ``ugd_ops.dense_mask`` of the packed sample), ``batch`` (the ``pack``
    dict), ``paradigm`` (its name), ``mask_kind`` (the ``ugd_ops.row_intervals`` mask; ``"bidirectional"`` for
    ``ttm``, whose query and document are two separate sequences, one per backbone).
    """
    impl = paradigm if isinstance(paradigm, Paradigm) else paradigms.get(paradigm)
    paradigm, parts, mask_kind = impl.name, impl.parts, impl.mask
    config = config or LayoutConfig()
    ids = add_special_tokens(tokenizer)
    if mask_kind is None:  # ttm: query and document alone, each its own bidirectional sequence
        samples = [encode_sample(tokenizer, ids, query, document, reason, config=config, parts=p) for p in ("q", "d")]
        mask_kind = "bidirectional"
    else:
        samples = [encode_sample(tokenizer, ids, query, document, reason, config=config, parts=parts)]
    batch = pack(samples, mask_kind)
    mask = ugd_ops.dense_mask(batch["cu_seqlens"], batch["kv_start"], batch["kv_end"])
    span_of = []
    for s in samples:
        for name, n in zip(SPAN_NAMES, s.spans):
            span_of += [name] * n
    tokens = [_display_token(t) for t in tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())]
    return {"tokens": tokens, "span_of": span_of, "mask": mask, "batch": batch,
            "paradigm": paradigm, "mask_kind": mask_kind}


def mask_image(part: dict):
    """The RGB image [T, T, 3] (numpy, float) of a ``partition`` dict: span colours where allowed, grey elsewhere."""
    mask = part["mask"].cpu().numpy()
    span_of = part["span_of"]
    T = len(span_of)
    img = np.empty((T, T, 3), dtype=np.float64)
    img[:] = MASKED_COLOR
    rows = np.array([SPAN_NAMES.index(s) for s in span_of])
    for i in range(T):
        own = SPAN_COLORS[span_of[i]]
        allowed = mask[i]
        if span_of[i] in ("Q", "D"):
            cross = allowed & (rows != rows[i])
            img[i, allowed & ~cross] = own
            img[i, cross] = _lighten(own)
        else:
            img[i, allowed] = own
    return img


def draw_partition(part: dict, ax=None):
    """Draws a ``partition`` dict on ``ax`` (a new figure when None); returns ``(fig, ax)``."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tokens, span_of = part["tokens"], part["span_of"]
    T = len(tokens)
    img = mask_image(part)
    if ax is None:
        side = min(max(6.0, 0.24 * T + 3.0), 40.0)
        fig, ax = plt.subplots(figsize=(side + 2.6, side))
    else:
        fig = ax.figure
        side = min(fig.get_size_inches())
    grow = max(1.0, side / 14.0)  # titles and legend grow with the figure, tick labels fit the cells
    ax.imshow(img, interpolation="nearest", aspect="equal")

    # thin cell grid, thicker lines at span and sequence boundaries
    ax.set_xticks([x - 0.5 for x in range(1, T)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, T)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    cu = part["batch"]["cu_seqlens"].tolist()
    bounds = sorted({i for i in range(1, T) if span_of[i] != span_of[i - 1]} | set(cu[1:-1]))
    for b in bounds:
        lw = 2.2 if b in cu else 1.2
        ax.axhline(b - 0.5, color="#333333", linewidth=lw)
        ax.axvline(b - 0.5, color="#333333", linewidth=lw)

    fs = 8 if T <= 150 else max(3, int(1200 / T))
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_xticklabels(tokens, rotation=90, fontsize=fs)
    ax.set_yticklabels(tokens, fontsize=fs)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False)
    for tx, ty, s in zip(ax.xaxis.get_major_ticks(), ax.yaxis.get_major_ticks(), span_of):
        dark = tuple(c * 0.55 for c in SPAN_COLORS[s])
        tx.label1.set_color(dark)
        tx.label2.set_color(dark)
        ty.label1.set_color(dark)
    ax.set_xlabel("keys (attended tokens)", fontsize=10 * grow)
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("queries (attending tokens)", fontsize=10 * grow)

    # span names along the right edge
    start = 0
    for i in range(1, T + 1):
        if i == T or span_of[i] != span_of[start] or i in cu:
            ax.text(T - 0.5 + 0.4, (start + i - 1) / 2, span_of[start], va="center", ha="left",
                    fontsize=11 * grow, fontweight="bold", color=tuple(c * 0.65 for c in SPAN_COLORS[span_of[start]]),
                    clip_on=False)
            start = i

    present = [s for s in SPAN_NAMES if s in span_of]
    handles = [Patch(facecolor=SPAN_COLORS[s], edgecolor="#555555", label=SPAN_LABELS[s]) for s in present]
    mask = part["mask"].cpu()
    rows = torch.tensor([SPAN_NAMES.index(s) for s in span_of])
    qd_rows = torch.tensor([s in ("Q", "D") for s in span_of])
    if bool((mask & (rows[:, None] != rows[None, :]) & qd_rows[:, None]).any()):
        handles.append(Patch(facecolor=_lighten(SPAN_COLORS["Q"]), edgecolor="#555555",
                             label="lighter: Q/D rows reading other spans"))
    handles.append(Patch(facecolor=MASKED_COLOR, edgecolor="#555555", label="masked"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.04, 1.0), fontsize=9 * grow,
              frameon=False)

    paradigm, mp = part["paradigm"], part["mask_kind"]
    spans = part["batch"]["spans"].tolist()
    if paradigm == "ttm":
        sub = f"two backbones: query (Lq={spans[0][0]}) and document (Ld={spans[1][1]}) as separate sequences, " \
              f"'{mp}' mask"
    else:
        Lq, Ld, Lp, Lg = spans[0]
        sub = f"mask '{mp}'   Lq={Lq}  Ld={Ld}  Lp={Lp}  Lg={Lg}   (row i may read the coloured cells of row i)"
    ax.set_title(f"UGD attention partition: {paradigm}\n{sub}", fontsize=11 * grow, pad=12 * grow)
    fig.tight_layout()
    return fig, ax


def render(tokenizer, query: str, document: str, reason: str | None = None, *, paradigm: str = "ugd-ttm",
           output: str = "partition.png", config: LayoutConfig | None = None, dpi: int = 150) -> dict:
    """``partition`` + ``draw_partition``, saved as a PNG at ``output``; returns the partition dict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = partition(tokenizer, query, document, reason, paradigm=paradigm, config=config)
    fig, _ = draw_partition(part)
    fig.savefig(output, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return part


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ugd.viz", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--query", default=EXAMPLE["query"])
    p.add_argument("--document", default=EXAMPLE["document"])
    p.add_argument("--reason", default=EXAMPLE["reason"], help="'' for no G span")
    p.add_argument("--paradigm", default="ugd-ttm", choices=sorted(paradigms.names()))
    p.add_argument("--prompt", default=LayoutConfig.prompt)
    p.add_argument("--position-mode", default="restart", choices=["restart", "continuous"])
    p.add_argument("--max-query-len", type=int, default=LayoutConfig.max_query_len)
    p.add_argument("--max-document-len", type=int, default=LayoutConfig.max_document_len)
    p.add_argument("--max-reason-len", type=int, default=LayoutConfig.max_reason_len)
    p.add_argument("--tokenizer", default=None,
                   help="local path for AutoTokenizer.from_pretrained (no download); default: ugd.testing's tokenizer")
    p.add_argument("--output", default="partition.png")
    p.add_argument("--dpi", type=int, default=150)
    args = p.parse_args(argv)
    try:
        config = LayoutConfig(prompt=args.prompt, max_query_len=args.max_query_len,
                              max_document_len=args.max_document_len, max_reason_len=args.max_reason_len,
                              position_mode=args.position_mode)
        if args.tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        else:
            prompt_words = config.prompt
            for special in SPECIAL_TOKENS.values():
                prompt_words = prompt_words.replace(special, " ")
            tokenizer = make_test_tokenizer([args.query, args.document, args.reason, prompt_words])
        part = render(tokenizer, args.query, args.document, args.reason or None, paradigm=args.paradigm,
                      output=args.output, config=config, dpi=args.dpi)
    except (ValueError, OSError) as e:
        print(f"ugd.viz: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({len(part['tokens'])} tokens, paradigm {args.paradigm})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
