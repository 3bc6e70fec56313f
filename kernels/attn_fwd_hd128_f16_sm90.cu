/* attn_fwd_hd128_f16_sm90.cu — private: the Hopper (sm_90a) forward kernel for head dim 128, f16
 * (with skipping and with skipping compiled out). Built with the 90a gencode only. */
#define LA_ATTN_FWD_INSTANTIATE 1
#include "fwd_sm90.cuh"

namespace la_cuda {
namespace sm90 {
LA_FWD_INSTANCE(128, __half)
}
}
