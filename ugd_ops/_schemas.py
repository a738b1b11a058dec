"""Schemas of the ugd_ops operator library.

They must equal the strings in csrc/ugd_ops.cpp (tests/ops/test_build.py compares them): when the
compiled library is missing, ugd_ops defines the same operators from here and runs them on the
pure-PyTorch reference, so that code written against ``torch.ops.ugd_ops`` works either way.
"""

SCHEMAS = {
    "partitioned_attention_fwd": (
        "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor kv_start, Tensor kv_end, "
        "int? max_seqlen, float softmax_scale) -> (Tensor out, Tensor lse)"
    ),
    "partitioned_attention_bwd": (
        "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
        "Tensor cu_seqlens, Tensor kv_start, Tensor kv_end, int? max_seqlen, float softmax_scale) "
        "-> (Tensor dq, Tensor dk, Tensor dv)"
    ),
    "detached_kl_fwd": (
        "(Tensor p_logits, Tensor q_logits, float temperature, bool grad_p, bool grad_q) "
        "-> (Tensor loss, Tensor grad_p, Tensor grad_q)"
    ),
    "linear_cross_entropy_fwd": (
        "(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor? per_sample, int ignore_index, "
        "str reduction, int chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) "
        "-> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)"
    ),
    "linear_cross_entropy_bwd": (
        "(Tensor grad_rows, Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
        "int chunk_size, bool grad_hidden, bool grad_weight, bool grad_bias) "
        "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)"
    ),
    "row_intervals": "(Tensor spans, str mask) -> (Tensor cu_seqlens, Tensor kv_start, Tensor kv_end)",
    "dense_mask": "(Tensor cu_seqlens, Tensor kv_start, Tensor kv_end) -> Tensor",
    "build_info": "() -> str",
}

# Operators whose missing CUDA kernel is worth a warning (the reference runs instead, slowly).
HOT_OPS = ("partitioned_attention_fwd", "partitioned_attention_bwd", "detached_kl_fwd")

MASKS = ("ttm", "stm", "causal", "bidirectional")
CPU_MAX_HEAD_DIM = 1024
