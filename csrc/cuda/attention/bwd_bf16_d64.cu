// One instantiation of the CUDA attention backward kernels (bwd_kernel.cuh): bf16, head dim 64.
#define UGD_BWD_INSTANTIATE
#define UGD_BWD_BF16 true
#define UGD_BWD_D 64
#include "bwd_kernel.cuh"
