/* attn_fwd_hd64_bf16.cu — private: the forward kernel for head dim 64, bf16 (with skipping and
 * with skipping compiled out). One instance per file keeps nvcc parallel and prunable. */
#define LA_ATTN_FWD_INSTANTIATE 1
#include "attn_fwd.cuh"

namespace la_cuda {
LA_ATTN_FWD_INSTANCE(64, __nv_bfloat16)
}
