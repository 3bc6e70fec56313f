/* attn_fwd_hd128_bf16.cu — private: the forward kernel for head dim 128, bf16 (with skipping and
 * with skipping compiled out). One instance per file keeps nvcc parallel and prunable. */
#define LA_ATTN_FWD_INSTANTIATE 1
#include "attn_fwd.cuh"

namespace la_cuda {
LA_ATTN_FWD_INSTANCE(128, __nv_bfloat16)
}
