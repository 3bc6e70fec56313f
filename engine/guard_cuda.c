/*
 * guard_cuda.c — the warm seed and the guardrail on the CUDA backend (guard_cuda.h). The
 * samples of a checked call are one more call of the attention kernels (la_attn_fwd_cuda,
 * LSE only, mode dense) on their Q rows gathered into scratch (guard_sample_params), so that
 * every sampled (b, h, q-tile) runs at once and the check costs about one q-tile row's time
 * (while n * B * H CTAs fit the device), not one per sample; the gather, the comparison and
 * the fill are kernels/guard.cu, which follows kernels/guard_ref.c.
 */
#ifdef LA_HAVE_CUDA

#include <stdlib.h>
#include <string.h>

#include "guard.h"
#include "guard_cuda.h"
#include "la_cuda.h"

#define ALIGN(n) (((n) + 255) & ~(size_t)255)

void gguard_init(gguard *gg, int n_slots)
{
    memset(gg, 0, sizeof *gg);
    gg->n_slots = n_slots;
}

cudaError_t gguard_alloc(gguard *gg)
{
    cudaError_t e;
    gg->scratch = calloc((size_t)gg->n_slots, sizeof *gg->scratch);
    if (!gg->scratch)
        return cudaErrorMemoryAllocation;
    if ((e = cudaMalloc((void **)&gg->d_counts, (size_t)gg->n_slots * 8)) != cudaSuccess)
        return e;
    return cudaHostAlloc((void **)&gg->h_counts, (size_t)gg->n_slots * 8, cudaHostAllocPortable);
}

void gguard_teardown(gguard *gg)
{
    for (int k = 0; gg->scratch && k < gg->n_slots; k++)
        if (gg->scratch[k])
            cudaFree(gg->scratch[k]);
    free(gg->scratch);
    if (gg->d_counts)
        cudaFree(gg->d_counts);
    if (gg->h_counts)
        cudaFreeHost(gg->h_counts);
    memset(gg, 0, sizeof *gg);
}

/* Scratch layout of a checked call: [call LSE B*H*Sq][samples' LSE B*H*n*BM][gathered Q
 * B*n*BM*H*D]. */
static void layout(const be_job *j, size_t *lse_bytes, size_t *dense_bytes, size_t *q_bytes)
{
    const la_attn_params *p = &j->p;
    size_t q_elems, lse_floats;
    guard_sample_sizes(j, &q_elems, &lse_floats);
    *lse_bytes = ALIGN((size_t)p->B * p->H * p->Sq * sizeof(float));
    *dense_bytes = ALIGN(lse_floats * sizeof(float));
    *q_bytes = ALIGN(q_elems * la_dtype_size(p->dtype));
}

cudaError_t gguard_before(gguard *gg, be_job *j, int slot, int filled, cudaStream_t st)
{
    cudaError_t e;
    if (filled && j->held &&
        (e = cudaMemsetAsync(j->held, 0, (size_t)j->held_len, st)) != cudaSuccess)
        return e;
    if (j->has_seed && j->p.mask && j->mask) {
        /* From the pinned host view (the seed was placed there when the service thread made
         * the view, before any job could launch; launch_blocked saw it made, so the pointer
         * is formed here and not by the loop thread, for which m->host may still be NULL). */
        uint32_t *seed_dev = (uint32_t *)(void *)((char *)j->mask->dev_ptr + j->seed_off);
        const void *seed_host = (const char *)j->mask->host + j->seed_off;
        if ((e = cudaMemcpyAsync(seed_dev, seed_host, (size_t)j->mask_len, cudaMemcpyHostToDevice,
                                 st)) != cudaSuccess ||
            (e = la_mask_and_cuda(j->p.mask, seed_dev, (size_t)(j->mask_len / 4), st)) !=
                cudaSuccess)
            return e;
    }
    if (j->guard_n) {
        size_t lb, db, ob;
        layout(j, &lb, &db, &ob);
        /* One allocation per checked call, from the stream's pool: lanes run at once, so a
         * scratch shared by the device would need a lock the streams cannot take. */
        if ((e = cudaMallocAsync(&gg->scratch[slot], lb + db + ob, st)) != cudaSuccess) {
            gg->scratch[slot] = NULL;
            return e;
        }
        if (!j->p.lse) {
            const la_attn_params *p = &j->p;
            j->p.lse = (float *)gg->scratch[slot];
            j->p.lse_stride[2] = 1;
            j->p.lse_stride[1] = p->Sq;
            j->p.lse_stride[0] = (int64_t)p->H * p->Sq;
        }
    }
    return cudaSuccess;
}

void gguard_abort(gguard *gg, int slot, cudaStream_t st)
{
    if (slot >= 0 && slot < gg->n_slots && gg->scratch && gg->scratch[slot]) {
        cudaFreeAsync(gg->scratch[slot], st);
        gg->scratch[slot] = NULL;
    }
}

cudaError_t gguard_after(gguard *gg, be_job *j, int slot, cudaStream_t st)
{
    cudaError_t e;
    const la_attn_params *p = &j->p;
    if (j->guard_n) {
        size_t lb, db, ob;
        layout(j, &lb, &db, &ob);
        char *scratch = gg->scratch[slot];
        float *dense = (float *)(void *)(scratch + lb);
        void *qs = scratch + lb + db;
        la_attn_params sp = guard_sample_params(j, qs, dense);
        if ((e = la_guard_gather_q_cuda(qs, p->q, p->q_stride, p->B, p->Sq, p->H, p->D,
                                        la_dtype_size(p->dtype), p->BM, j->guard_tile,
                                        j->guard_n, st)) != cudaSuccess ||
            (e = la_attn_fwd_cuda(&sp, st)) != cudaSuccess)
            return e;
        la_guard_params gp = guard_compare_params(j, dense, j->guard_n);
        if ((e = cudaMemsetAsync(gg->d_counts + slot, 0, 8, st)) != cudaSuccess ||
            (e = la_guard_compare_cuda(&gp, gg->d_counts + slot, st)) != cudaSuccess ||
            (e = cudaMemcpyAsync(gg->h_counts + slot, gg->d_counts + slot, 8,
                                 cudaMemcpyDeviceToHost, st)) != cudaSuccess)
            return e;
        if ((e = cudaFreeAsync(gg->scratch[slot], st)) != cudaSuccess)
            return e;
        gg->scratch[slot] = NULL;
        /* Tiles of the samples: every k-tile but the must-skip-only ones, per (b, h, q-tile). */
        uint32_t flags[2 * (LA_CUDA_MAX_K_TILES / 32)];
        int32_t k_tiles = la_tiles(p->Sk, p->BN), words = la_mask_words(k_tiles), skip_only = 0;
        la_tile_flags(p, flags, flags + words);
        for (int32_t w = 0; w < words; w++)
            skip_only += __builtin_popcount(flags[words + w]);
        j->guard_rows = (uint64_t)j->guard_n * p->B * p->H;
        j->guard_tiles = j->guard_rows * (uint64_t)(k_tiles - skip_only);
    }
    if (j->held && p->mask && !p->decisions && p->mode != LA_MODE_DENSE)
        return la_mask_fill_held_cuda(p->mask, p->mask_stride, j->rows_b, j->rows_h, j->rows_nq,
                                      (int32_t)j->mask_words, (int32_t)j->mask_k_tiles, j->held,
                                      st);
    return cudaSuccess;
}

void gguard_done(gguard *gg, be_job *j, int slot)
{
    if (j->guard_n && gg->h_counts && slot >= 0 && slot < gg->n_slots)
        j->guard_restored = gg->h_counts[slot];
}

#endif /* LA_HAVE_CUDA */
