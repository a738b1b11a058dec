"""Building blocks of the model (what ``ugd.model`` and the paradigms are made of).

    attention  attn_implementation="ugd" for transformers: packed batches to the partitioned-attention kernels
    heads      UGDHeads: FC_t, FC_s and the KL projections of the UGD paradigms
    losses     classification, generation and distillation losses (ugd_ops kernels)
    packed     UGDOutput, running a packed batch through a backbone (encode_packed, packed_inputs)
"""
