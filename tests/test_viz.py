"""ugd.viz: the partition picture is drawn from the real layout."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ugd_ops
from ugd.data.packing import pack
from ugd.data.layout import LayoutConfig, add_special_tokens, encode_sample
from ugd.testing import make_test_tokenizer
from ugd.viz import EXAMPLE, MASKED_COLOR, draw_partition, main, partition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_writes_png(tmp_path):
    out = tmp_path / "tmp.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-m", "ugd.viz", "--output", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_main_in_process(tmp_path, capsys):
    out = tmp_path / "stm.png"
    assert main(["--paradigm", "ugd-stm", "--reason", "", "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--prompt", "no placeholder [CLS]", "--output", str(tmp_path / "x.png")]) == 2
    assert "[gMask]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("paradigm, mask", [("ugd-ttm", "ttm"), ("ugd-stm", "stm"), ("stm", "stm"),
                                            ("shared-ttm", "ttm"), ("ttm", "bidirectional")])
def test_rendered_mask_is_the_dense_mask(paradigm, mask):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tok = make_test_tokenizer(list(EXAMPLE.values()))
    part = partition(tok, EXAMPLE["query"], EXAMPLE["document"], EXAMPLE["reason"], paradigm=paradigm)
    fig, ax = draw_partition(part)
    try:
        img = np.asarray(ax.images[0].get_array())
        drawn = torch.from_numpy(~np.all(np.isclose(img, MASKED_COLOR), axis=-1))

        # the same sample, laid out and packed independently of ugd.viz
        ids = add_special_tokens(tok)
        cfg = LayoutConfig()
        if paradigm == "ttm":
            ss = [encode_sample(tok, ids, EXAMPLE["query"], EXAMPLE["document"], EXAMPLE["reason"], config=cfg, parts=p)
                  for p in ("q", "d")]
        else:
            parts = {"ugd-ttm": "qdpg", "ugd-stm": "qdpg", "stm": "qdp", "shared-ttm": "qd"}[paradigm]
            ss = [encode_sample(tok, ids, EXAMPLE["query"], EXAMPLE["document"], EXAMPLE["reason"], config=cfg,
                                parts=parts)]
        spans = torch.tensor([s.spans for s in ss], dtype=torch.int32)
        expected = ugd_ops.dense_mask(*ugd_ops.row_intervals(spans, mask))
        assert drawn.shape == expected.shape
        assert torch.equal(drawn, expected)
        assert part["mask_kind"] == mask

        T = expected.shape[0]
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert len(labels) == T == len(part["tokens"])
        assert part["tokens"] == tok.convert_ids_to_tokens(pack(ss, mask)["input_ids"][0].tolist())
        assert paradigm in ax.get_title()
    finally:
        plt.close(fig)
