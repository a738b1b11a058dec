"""Mixed precision: the hot ops under torch.autocast behave as PyTorch's own ops do.

partitioned_attention casts q, k, v to the autocast dtype (as scaled_dot_product_attention does);
linear_cross_entropy runs its matmul in it (as F.linear does); detached_kl meets mixed logits in the
wider dtype. Outside autocast mixed dtypes stay an error, and fp64 is never cast.
"""

import pytest
import torch
from tests.conftest import DEVICES
from tests.ops.test_attention import layout, randn

import ugd_ops
from ugd_ops.workloads import random_spans

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _attention_inputs(device, D=32, seed=0):
    lay, mask = layout(random_spans(4, seed=seed + 3, max_len=30), "stm", device)
    T = int(lay[0][-1])
    q, k = randn((T, 4, D), torch.float32, device, seed), randn((T, 2, D), torch.float32, device, seed + 1)
    v = randn((T, 2, D), torch.bfloat16, device, seed + 2)
    return (q, k, v), lay


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_attention_mixed_inputs_under_autocast(device, dtype):
    """RoPE leaves q and k in fp32 while v comes out of a bf16 matmul."""
    (q, k, v), lay = _attention_inputs(device)
    q.requires_grad_()
    with pytest.raises(ValueError, match="dtype"):
        ugd_ops.partitioned_attention(q, k, v, *lay)  # no autocast: still an error, as in SDPA
    with torch.autocast(device, dtype=dtype):
        out, lse = ugd_ops.partitioned_attention(q, k, v, *lay, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    expect = ugd_ops.partitioned_attention(q.detach().to(dtype), k.to(dtype), v.to(dtype), *lay)
    torch.testing.assert_close(out, expect, atol=0, rtol=0)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_leaves_float64_alone(device):
    (q, k, v), lay = _attention_inputs(device)
    q, k, v = q.double(), k.double(), v.double()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = ugd_ops.partitioned_attention(q, k, v, *lay)
        loss = ugd_ops.detached_kl(q.reshape(-1, 32), k.repeat(1, 2, 1).reshape(-1, 32))
    assert out.dtype == torch.float64 and loss.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_detached_kl_mixed_logits_under_autocast(device):
    p = randn((17, 40), torch.bfloat16, device, 1).requires_grad_()
    q = randn((17, 40), torch.float32, device, 2)
    with pytest.raises(ValueError):
        ugd_ops.detached_kl(p, q)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = ugd_ops.detached_kl(p, q, temperature=2.0)
    assert loss.dtype == torch.float32
    expect = ugd_ops.detached_kl(p.detach().float(), q, temperature=2.0)
    torch.testing.assert_close(loss, expect)
    loss.backward()
    assert p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad.float()).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_linear_cross_entropy_runs_its_matmul_in_the_autocast_dtype(device, dtype):
    hidden = randn((33, 16), torch.float32, device, 3).requires_grad_()
    weight = randn((50, 16), torch.float32, device, 4).requires_grad_()
    targets = torch.randint(0, 50, (33,), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(device, dtype=dtype):
        loss = ugd_ops.linear_cross_entropy(hidden, weight, targets)
    assert loss.dtype == torch.float32
    expect = ugd_ops.linear_cross_entropy(hidden.detach().to(dtype), weight.detach().to(dtype), targets)
    torch.testing.assert_close(loss, expect, atol=0, rtol=0)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32


def test_packed_hf_forward_under_cpu_autocast_matches_sdpa():
    """An fp32 model under bf16 autocast: "ugd" on the packed batch against SDPA with the dense mask."""
    pytest.importorskip("transformers")
    from tests.modules.test_hf_attention import dense_additive_mask, make_models, packed_batch, ugd_kwargs

    batch = packed_batch([[3, 5, 3, 4], [2, 4, 3, 2], [5, 2, 3, 3]], "stm")
    ugd_model, sdpa_model = make_models("qwen2", "ugd", "sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        got = ugd_model(use_cache=False, **ugd_kwargs(batch)).logits
        want = sdpa_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                          attention_mask=dense_additive_mask(batch), use_cache=False).logits
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 3e-2 * max(1.0, want.float().abs().max().item()), err


def test_train_bf16_runs_a_few_steps_on_the_cpu(tmp_path):
    """`python -m ugd.train --bf16`: the Trainer's CPU autocast around the packed model."""
    pytest.importorskip("transformers")
    from tests.test_train import run_args

    from ugd.train import main

    from transformers import TrainerCallback

    seen = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen["bf16"] = args.bf16

    summary = main(run_args(tmp_path, "bf16", "--bf16", "true", "--max_steps", "3"), callbacks=[Spy()])
    assert seen["bf16"] is True and summary["global_step"] == 3
    loss = summary["train"]["train_loss"]
    assert loss == loss and abs(loss) < 1e4
