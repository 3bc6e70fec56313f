/* attn_fwd_hd64_bf16_sm80.cu — private: the portable (sm80 family) forward kernel for head dim
 * 64, bf16 (with skipping and with skipping compiled out). One instance per file keeps nvcc
 * parallel and prunable. */
#define LA_ATTN_FWD_INSTANTIATE 1
#include "fwd_sm80.cuh"

namespace la_cuda {
namespace sm80 {
LA_FWD_INSTANCE(64, __nv_bfloat16)
}
}
