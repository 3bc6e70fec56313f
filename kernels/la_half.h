/*
 * la_half.h — private: conversions between f32 and the 16-bit float formats, shared by the CPU
 * reference and the host-side tools. Round to nearest even; NaN stays NaN, overflow gives inf.
 */
#ifndef LA_HALF_H
#define LA_HALF_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float la_cvt_bf16_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float la_cvt_f16_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (e == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (e != 0) {
        u = sign | ((e + 112u) << 23) | (man << 13);
    } else {
        /* Zero or subnormal: man * 2^-24 is exact in fp32. */
        float f = (float)man * 0x1p-24f;
        memcpy(&u, &f, 4);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest, ties to even; NaN stays NaN (quiet), overflow gives inf. */
static inline uint16_t la_cvt_f32_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline uint16_t la_cvt_f32_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return sign | 0x7e00u;
    if (a >= 0x477ff000u) /* >= 65520 rounds past the largest half, 65504 */
        return sign | 0x7c00u;
    if (a < 0x38800000u) {
        /* Below 2^-14: subnormal half. Scaling by 2^24 is exact; rintf rounds half to even in
         * the default rounding mode. 1024 lands on the smallest normal, as it should. */
        float af;
        memcpy(&af, &a, 4);
        return sign | (uint16_t)rintf(af * 0x1p24f);
    }
    uint32_t v = a - (112u << 23); /* rebias 127 -> 15 */
    v += 0xfffu + ((v >> 13) & 1u);
    return sign | (uint16_t)(v >> 13);
}

#endif /* LA_HALF_H */
