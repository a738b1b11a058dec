// The fp16, head dim 128 instantiation of the CUDA partitioned-attention backward (one per file:
// the four compile in parallel, and a change to one kernel variant rebuilds only its file).
#include "bwd_kernel.cuh"

namespace ugd_ops::cuda::attn {

template <>
void launch_bwd<false, 128>(const BwdParams& p, cudaStream_t stream) {
  launch_bwd_impl<false, 128>(p, stream);
}

}  // namespace ugd_ops::cuda::attn
