// The bf16, head dim 128 instantiation of the CUDA partitioned-attention forward (one per file:
// the four compile in parallel, and a change to one kernel variant rebuilds only its file).
#include "fwd_kernel.cuh"

namespace ugd_ops::cuda::attn {

template <>
void launch_fwd<true, 128>(const FwdParams& p, int64_t slots, cudaStream_t stream) {
  launch_fwd_impl<true, 128>(p, slots, stream);
}

}  // namespace ugd_ops::cuda::attn
