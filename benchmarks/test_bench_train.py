"""A UGD training step (forward, backward, optimizer step) with ``attn_implementation="ugd"`` against
the same model under stock SDPA with a padded batch and a dense 4D mask (what a plain transformers
pipeline does with the UGD partition).

    pytest benchmarks/test_bench_train.py --benchmark-only

Shapes:
* ``qwen2.5-1.5b`` (GPU only, skipped without CUDA): a random-init Qwen2 of Qwen2.5-1.5B's shape
  (hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocab 151936, tied embeddings), bf16
  weights, AdamW, the ``qlq`` workload of docs/spec.md section 9 (32 samples, query/document/reason around
  31/230/146 tokens), random token ids.
* ``cpu-small``: 2 layers, hidden 128, 4 heads, 2 KV heads, vocab 1000, fp32, 8 ``qlq`` samples --
  finishes in seconds; it checks the harness and gives a CPU figure, not a GPU one.

Recorded in ``extra_info``: samples/s and tokens/s at the median, peak GPU memory (CUDA) or peak
RSS (CPU), model FLOPs per step and MFU. FLOPs count useful work only: 6 x (non-embedding parameters)
x tokens for the matrix products, the LM head on the reason tokens only (6 x H x V per G token), and
attention over the allowed (query, key) pairs (4 x D x Hq per pair and layer forward, 2.5x backward,
docs/spec.md section 9) -- the padded peer does the same useful work in more time. MFU divides by the
GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s); there is none on a CPU.
"""

from __future__ import annotations

import copy
import resource

import pytest
import torch

from ugd_ops.workloads import allowed_pairs, make_spans, padded_batch

CUDA = torch.cuda.is_available()

SHAPES = {
    "qwen2.5-1.5b": dict(config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                     num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                     max_position_embeddings=4096, tie_word_embeddings=True),
                         batch=32, device="cuda", dtype=torch.bfloat16, rounds=5),
    "cpu-small": dict(config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048,
                                  tie_word_embeddings=True),
                      batch=8, device="cpu", dtype=torch.float32, rounds=3),
}
# ugd: attn_implementation="ugd" on the packed batch. sdpa-padded: stock SDPA, a padded batch and a dense 4D
# mask (a plain transformers pipeline). flex-packed: what a savvy transformers user builds -- the packed
# batch under attn_implementation="flex_attention" with a BlockMask from create_block_mask (a mask_mod
# over document ids and the per-row intervals), built every batch; CUDA only (flex has no CPU backward).
IMPLS = ("ugd", "sdpa-padded", "flex-packed")
NUM_LABELS = 4
# dense bf16 peak TFLOP/s by GPU name fragment
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def make_batch(spans: torch.Tensor, vocab: int, seed: int = 0) -> dict:
    """A packed ugd-ttm batch of random tokens with the layout of ``spans`` (as UGDCollator builds it)."""
    from ugd.data.packing import pack
    from ugd.data.layout import EncodedSample

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for Lq, Ld, Lp, Lg in spans.tolist():
        n = Lq + Ld + Lp + Lg
        ids = torch.randint(10, vocab, (n,), generator=gen).tolist()
        pos = list(range(Lq)) + list(range(Ld)) + list(range(Lq + Ld, n))
        targets = torch.randint(10, vocab, (Lg,), generator=gen).tolist()
        samples.append(EncodedSample(ids, pos, [-100] * (n - Lg) + targets, (Lq, Ld, Lp, Lg),
                                     int(torch.randint(0, NUM_LABELS, (1,), generator=gen))))
    return pack(samples, "ttm")


def padded_inputs(batch: dict, dtype: torch.dtype, device) -> dict:
    """The packed batch as a padded [B, L] batch with a dense additive [B, 1, L, L] mask (the partition
    per sample; padding rows see only themselves, so that no softmax row is empty)."""
    p = padded_batch(batch)
    mask = torch.zeros(p["allowed"].shape, dtype=dtype).masked_fill_(~p["allowed"], torch.finfo(dtype).min)
    return {"input_ids": p["input_ids"].to(device), "position_ids": p["position_ids"].to(device),
            "attention_mask": mask[:, None].to(device), "valid": p["valid"].to(device)}


def build_model(impl: str, shape: dict, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen2Config

    import ugd.modules.attention  # noqa: F401
    from ugd.model import UGDConfig, UGDModel

    class PaddedSDPAModel(UGDModel):
        """UGDModel whose backbone runs a padded batch with a dense 4D mask under SDPA; the heads and
        losses are UGDModel's own, on the same [T, H] hidden states."""

        padded: dict | None = None

        def encode(self, pack, *, backbone=None):
            backbone = backbone or self.backbone
            p = self.padded
            hidden = backbone.get_decoder()(input_ids=p["input_ids"], position_ids=p["position_ids"],
                                            attention_mask=p["attention_mask"], use_cache=False).last_hidden_state
            return hidden[p["valid"]]

    class PackedFlexModel(UGDModel):
        """UGDModel whose backbone runs the packed batch under attn_implementation="flex_attention" with a
        BlockMask built by create_block_mask for every batch, as a transformers user would."""

        def encode(self, pack, *, backbone=None):
            backbone = backbone or self.backbone
            mask = savvy_block_mask(pack["cu_seqlens"], pack["kv_start"], pack["kv_end"])
            return backbone.get_decoder()(input_ids=pack["input_ids"], position_ids=pack["position_ids"],
                                          attention_mask=mask, use_cache=False).last_hidden_state[0]

    torch.manual_seed(seed)
    cfg = Qwen2Config(**shape["config"])
    attn = {"ugd": "ugd", "sdpa-padded": "sdpa", "flex-packed": "flex_attention"}[impl]
    with torch.device(shape["device"]):
        backbone = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn,
                                                    dtype=shape["dtype"])
    ucfg = UGDConfig(paradigm="ugd-ttm", num_labels=NUM_LABELS)
    cls = {"ugd": UGDModel, "sdpa-padded": PaddedSDPAModel, "flex-packed": PackedFlexModel}[impl]
    model = cls(backbone, ucfg).to(shape["device"], shape["dtype"])
    return model


def savvy_block_mask(cu_seqlens: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor):
    """The partition as a FlexAttention BlockMask the usual way: a mask_mod over document ids and
    intervals, handed to create_block_mask (compiled on CUDA), a [1, 1, T, T] mask for transformers."""
    from torch.nn.attention.flex_attention import create_block_mask

    from attention_peers import flex_mask_mod  # the flex attention peer's mask_mod

    T = int(kv_start.shape[0])
    return create_block_mask(flex_mask_mod(cu_seqlens, kv_start, kv_end), 1, None, T, T, device=kv_start.device,
                             _compile=kv_start.is_cuda)


def step_flops(model, batch: dict) -> float:
    """Useful FLOPs of one training step (see the module docstring)."""
    cfg = model.backbone.config
    emb = model.backbone.get_input_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.backbone.parameters()) - emb
    T = int(batch["input_ids"].shape[1])
    G = int((batch["lm_labels"] != -100).sum())
    H, V, D = cfg.hidden_size, cfg.vocab_size, cfg.hidden_size // cfg.num_attention_heads
    pairs = allowed_pairs(batch["kv_start"], batch["kv_end"])
    attention = pairs * 4 * D * cfg.num_attention_heads * cfg.num_hidden_layers * 3.5
    heads = sum(p.numel() for p in model.heads.parameters()) * 6 * int(batch["labels"].numel())
    return 6.0 * non_embedding * T + 6.0 * H * V * G + attention + heads


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def run_step_benchmark(benchmark, bench_record, ugd_backend, impl: str, shape_name: str):
    shape = SHAPES[shape_name]
    device, dtype = shape["device"], shape["dtype"]
    spans = make_spans("qlq", batch=shape["batch"], seed=0)
    batch = make_batch(spans, shape["config"]["vocab_size"])
    try:
        model = build_model(impl, shape)
    except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
        pytest.skip(f"{impl} {shape_name}: out of GPU memory building the model")
    model.train()
    from ugd.model import move_batch

    batch = move_batch(batch, device)
    if impl == "sdpa-padded":
        model.padded = padded_inputs(batch, dtype, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    flops = step_flops(model, batch)
    T = int(batch["input_ids"].shape[1])
    padded_tokens = int(model.padded["valid"].numel()) if impl == "sdpa-padded" else T

    def fresh_layout():
        # Every training batch brings a new layout: new layout tensors each round, so that the per-batch
        # work inside the model (ugd's block mask and layout check, the flex peer's create_block_mask) is
        # timed every round rather than looked up from the first one.
        return (dict(batch, **{k: batch[k].clone() for k in ("cu_seqlens", "kv_start", "kv_end")}),), {}

    def step(batch):
        out = model(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return out.loss.detach()

    benchmark.group = f"train-step-{shape_name}"
    bench_record(device, impl=impl, shape=shape_name, workload="qlq", batch=shape["batch"], tokens=T,
                 padded_tokens=padded_tokens, dtype=str(dtype).removeprefix("torch."), flops_per_step=flops,
                 attention_backend={"ugd": ugd_backend("partitioned_attention_fwd", device, shape=shape),
                                    "sdpa-padded": "sdpa",
                                    "flex-packed": "flex_attention (create_block_mask per batch)"}[impl],
                 parameters=sum(p.numel() for p in model.parameters()))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        loss = benchmark.pedantic(step, setup=fresh_layout, rounds=shape["rounds"], iterations=1, warmup_rounds=1)
    except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
        benchmark.extra_info["oom"] = True
        pytest.skip(f"{impl} {shape_name}: out of GPU memory in the training step")
    assert torch.isfinite(loss)
    stats = getattr(benchmark, "stats", None)
    if stats:
        median = float(stats.stats.median)
        info = benchmark.extra_info
        info["median_s"] = median
        info["samples_per_s"] = shape["batch"] / median
        info["tokens_per_s"] = T / median
        info["achieved_tflops"] = flops / median / 1e12
        peak = peak_tflops(device)
        info["mfu"] = (flops / median / 1e12) / peak if peak else None
    if device == "cuda":
        benchmark.extra_info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        benchmark.extra_info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step_cpu_small(benchmark, bench_record, ugd_backend, impl):
    if impl == "flex-packed":
        pytest.skip("flex_attention has no backward on the CPU (the peer runs on CUDA)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady figures on a small shared machine
    try:
        run_step_benchmark(benchmark, bench_record, ugd_backend, impl, "cpu-small")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (Qwen2.5-1.5B shape)")
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step_qwen25_1p5b_gpu(benchmark, bench_record, ugd_backend, impl):  # pragma: no cover - GPU only
    run_step_benchmark(benchmark, bench_record, ugd_backend, impl, "qwen2.5-1.5b")
    torch.cuda.empty_cache()


def test_padded_peer_computes_the_same_loss_as_ugd():
    """The two implementations of the benchmark compute the same thing (cpu-small, fp32)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shape = SHAPES["cpu-small"]
        spans = make_spans("qlq", batch=3, seed=1)
        batch = make_batch(spans, shape["config"]["vocab_size"], seed=1)
        a = build_model("ugd", shape)
        b = build_model("sdpa-padded", shape)
        b.load_state_dict(a.state_dict())
        b.padded = padded_inputs(batch, torch.float32, "cpu")
        a.train()
        b.train()
        la, lb = a(batch), b(batch)
        assert la.terms.keys() == lb.terms.keys() and la.terms
        for term in la.terms:
            torch.testing.assert_close(la.terms[term], lb.terms[term], atol=2e-5, rtol=2e-5)
    finally:
        torch.set_num_threads(threads)


def test_flex_peer_computes_the_same_hidden_states_as_ugd():
    """The flex-packed peer's block mask and model path agree with ugd (cpu-small, fp32, no grad: flex
    runs on the CPU only without gradients)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shape = SHAPES["cpu-small"]
        batch = make_batch(make_spans("qlq", batch=3, seed=2), shape["config"]["vocab_size"], seed=2)
        a = build_model("ugd", shape).eval()
        b = build_model("flex-packed", shape).eval()
        b.load_state_dict(a.state_dict())
        with torch.no_grad():
            ha, hb = a.encode(batch), b.encode(batch)
        torch.testing.assert_close(hb, ha, atol=2e-5, rtol=2e-5)
    finally:
        torch.set_num_threads(threads)


def test_attention_backend_names_the_path_of_the_model_shape(ugd_backend):
    """With a model shape, ``ugd_backend`` names the path ugd_ops.partitioned_attention takes (on CUDA the
    operator's registration alone cannot say: it routes by dtype and head dim)."""
    from ugd_ops import _backend

    got = ugd_backend("partitioned_attention_fwd", "cpu", shape=SHAPES["cpu-small"])
    assert got == ("ugd_ops (cpu)" if _backend.compiled else "ugd_ops (reference)")
    assert ugd_backend("detached_kl_fwd", "cpu", shape=SHAPES["cpu-small"]) in ("compiled", "reference")
