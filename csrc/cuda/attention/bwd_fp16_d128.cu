// One instantiation of the CUDA attention backward kernels (bwd_kernel.cuh): fp16, head dim 128.
#define UGD_BWD_INSTANTIATE
#define UGD_BWD_BF16 false
#define UGD_BWD_D 128
#include "bwd_kernel.cuh"
