#include "CQKernels.h"
#include <string.h>
#include <math.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

typedef float uf32 __attribute__((aligned(1)));
typedef uint16_t uu16 __attribute__((aligned(1)));
typedef uint32_t uu32 __attribute__((aligned(1)));
typedef double uf64 __attribute__((aligned(1)));

#define LANES 16
#define BLOCK 4096

#if defined(__FAST_MATH__)
#error "kernels.c must not be compiled with -ffast-math: the round-half-even trick needs IEEE addition"
#endif

// Round half to even for |v| <= 2^22 by the add-and-subtract trick; callers
// clamp v to the integer range first, so the bound always holds.
#define RNE_MAGIC 12582912.0f

#define MINMAX_BODY                                                              \
    const uf32 *p = (const uf32 *)x;                                             \
    const uu32 *b = (const uu32 *)x;                                             \
    float lo[LANES], hi[LANES]; uint32_t bad[LANES];                             \
    for (int j = 0; j < LANES; j++) { lo[j] = INFINITY; hi[j] = -INFINITY; bad[j] = 0; } \
    int64_t i = 0;                                                               \
    for (; i + LANES <= n; i += LANES) {                                         \
        for (int j = 0; j < LANES; j++) {                                        \
            float v = p[i + j];                                                  \
            lo[j] = v < lo[j] ? v : lo[j];                                       \
            hi[j] = v > hi[j] ? v : hi[j];                                       \
            bad[j] |= ((b[i + j] & 0x7f800000u) == 0x7f800000u);                 \
        }                                                                        \
    }                                                                            \
    float l = INFINITY, h = -INFINITY; uint32_t anybad = 0;                      \
    for (int j = 0; j < LANES; j++) { l = lo[j] < l ? lo[j] : l; h = hi[j] > h ? hi[j] : h; anybad |= bad[j]; } \
    for (; i < n; i++) {                                                         \
        float v = p[i];                                                          \
        l = v < l ? v : l; h = v > h ? v : h;                                    \
        anybad |= ((b[i] & 0x7f800000u) == 0x7f800000u);                         \
    }                                                                            \
    *mn = l; *mx = h;                                                            \
    return anybad ? 1 : 0;

static int minmax_generic(const void *x, int64_t n, float *mn, float *mx) { MINMAX_BODY }
#if defined(__x86_64__)
__attribute__((target("avx2")))
static int minmax_avx2(const void *x, int64_t n, float *mn, float *mx) { MINMAX_BODY }
#endif

static int have_avx2(void) {
#if defined(__x86_64__)
    static int cached = -1;
    if (cached < 0) { __builtin_cpu_init(); cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"); }
    return cached;
#else
    return 0;
#endif
}

int qk_minmax_f32(const void *x, int64_t n, float *mn, float *mx) {
#if defined(__x86_64__)
    if (have_avx2()) return minmax_avx2(x, n, mn, mx);
#endif
    return minmax_generic(x, n, mn, mx);
}

// One lane of the quantize loop: v = x / scale, clamped to the integer range
// (minus the zero point), rounded half to even, then shifted by the zero point.
#define QUANT_LANE(XV, SC, ZP, OUTIDX)                                           \
    {                                                                            \
        float xv = (XV);                                                         \
        float v = xv / (SC);                                                     \
        float lo_ = (float)(qmin - (ZP)), hi_ = (float)(qmax - (ZP));            \
        clip[j] += (v < lo_ - 0.5f) | (v > hi_ + 0.5f);                          \
        v = v < lo_ ? lo_ : v;                                                   \
        v = v > hi_ ? hi_ : v;                                                   \
        float r = (v + RNE_MAGIC) - RNE_MAGIC;                                   \
        int32_t q = (int32_t)r + (ZP);                                           \
        out[OUTIDX] = (uint8_t)q;                                                \
        float xh = r * (SC);                                                     \
        float e = xv - xh;                                                       \
        float ae = e < 0 ? -e : e;                                               \
        sx2[j] += xv * xv; se2[j] += e * e; sxq[j] += xv * xh; sq2[j] += xh * xh; \
        me[j] = ae > me[j] ? ae : me[j];                                         \
    }

#define QUANT_PROLOGUE                                                           \
    const uf32 *p = (const uf32 *)x;                                             \
    float sx2[LANES], se2[LANES], sxq[LANES], sq2[LANES], me[LANES];             \
    int32_t clip[LANES];                                                         \
    double dx2 = 0, de2 = 0, dxq = 0, dq2 = 0; float maxe = m->max_err; int64_t clipped = 0; \
    int64_t i = 0;

#define QUANT_FLUSH                                                              \
    for (int j = 0; j < LANES; j++) {                                            \
        dx2 += sx2[j]; de2 += se2[j]; dxq += sxq[j]; dq2 += sq2[j];              \
        maxe = me[j] > maxe ? me[j] : maxe; clipped += clip[j];                  \
        sx2[j] = se2[j] = sxq[j] = sq2[j] = 0; me[j] = 0; clip[j] = 0;           \
    }

#define QUANT_ZERO for (int j = 0; j < LANES; j++) { sx2[j] = se2[j] = sxq[j] = sq2[j] = 0; me[j] = 0; clip[j] = 0; }

#define QUANT_EPILOGUE                                                           \
    m->sum_x2 += dx2; m->sum_e2 += de2; m->sum_xq += dxq; m->sum_q2 += dq2;      \
    m->max_err = maxe; m->clipped += clipped;

#define QUANT_BODY                                                               \
    QUANT_PROLOGUE                                                               \
    QUANT_ZERO                                                                   \
    while (i + LANES <= n) {                                                     \
        int64_t end = i + BLOCK; if (end > n) end = n;                           \
        for (; i + LANES <= end; i += LANES) {                                   \
            for (int j = 0; j < LANES; j++) QUANT_LANE(p[i + j], scale, zp, i + j) \
        }                                                                        \
        QUANT_FLUSH                                                              \
    }                                                                            \
    for (; i < n; i++) { const int j = 0; QUANT_LANE(p[i], scale, zp, i) }       \
    QUANT_FLUSH                                                                  \
    QUANT_EPILOGUE

static void quant_generic(const void *x, int64_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax, uint8_t *out, qk_metrics *m) { QUANT_BODY }
#if defined(__x86_64__)
__attribute__((target("avx2")))
static void quant_avx2(const void *x, int64_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax, uint8_t *out, qk_metrics *m) { QUANT_BODY }
#endif

void qk_quantize_int_f32(const void *x, int64_t n, float scale, int32_t zp,
                         int32_t qmin, int32_t qmax, uint8_t *out, qk_metrics *m) {
#if defined(__x86_64__)
    if (have_avx2()) { quant_avx2(x, n, scale, zp, qmin, qmax, out, m); return; }
#endif
    quant_generic(x, n, scale, zp, qmin, qmax, out, m);
}

#define QUANTV_BODY                                                              \
    QUANT_PROLOGUE                                                               \
    QUANT_ZERO                                                                   \
    while (i + LANES <= n) {                                                     \
        int64_t end = i + BLOCK; if (end > n) end = n;                           \
        for (; i + LANES <= end; i += LANES) {                                   \
            for (int j = 0; j < LANES; j++) QUANT_LANE(p[i + j], scales[i + j], zps[i + j], i + j) \
        }                                                                        \
        QUANT_FLUSH                                                              \
    }                                                                            \
    for (; i < n; i++) { const int j = 0; QUANT_LANE(p[i], scales[i], zps[i], i) } \
    QUANT_FLUSH                                                                  \
    QUANT_EPILOGUE

static void quantv_generic(const void *x, int64_t n, const float *scales, const int32_t *zps, int32_t qmin, int32_t qmax, uint8_t *out, qk_metrics *m) { QUANTV_BODY }
#if defined(__x86_64__)
__attribute__((target("avx2")))
static void quantv_avx2(const void *x, int64_t n, const float *scales, const int32_t *zps, int32_t qmin, int32_t qmax, uint8_t *out, qk_metrics *m) { QUANTV_BODY }
#endif

void qk_quantize_int_f32_vec(const void *x, int64_t n, const float *scales, const int32_t *zps,
                             int32_t qmin, int32_t qmax, uint8_t *out, qk_metrics *m) {
#if defined(__x86_64__)
    if (have_avx2()) { quantv_avx2(x, n, scales, zps, qmin, qmax, out, m); return; }
#endif
    quantv_generic(x, n, scales, zps, qmin, qmax, out, m);
}

// ---- float conversions ----

static float half_to_float_sw(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {   // subnormal: renormalise
            int e = -1;
            do { man <<= 1; e++; } while ((man & 0x400u) == 0);
            man &= 0x3ffu;
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 112u) << 23) | (man << 13);
    float f; memcpy(&f, &bits, 4); return f;
}

static uint16_t float_to_half_sw(float f) {
    uint32_t x; memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);   // rounds to >= 65520: overflow
    if (ax < 0x38800000u) {   // result is subnormal or zero
        if (ax < 0x33000000u) return (uint16_t)sign;          // < 2^-25: rounds to 0 (2^-25 ties to even 0)
        uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e;   // 14 + (113 - e) - ... : places the value in units of 2^-24
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);   // round to nearest even on the 13 dropped bits
    r -= 0x38000000u;                               // rebias 127 -> 15
    return (uint16_t)(sign | (r >> 13));
}

#if defined(__x86_64__)
__attribute__((target("avx2,f16c")))
static void f16_to_f32_hw(const void *src, int64_t n, float *dst) {
    const uint8_t *s = (const uint8_t *)src; int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(s + 2 * i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) { uint16_t h; memcpy(&h, s + 2 * i, 2); dst[i] = half_to_float_sw(h); }
}
__attribute__((target("avx2,f16c")))
static int64_t f32_to_f16_hw(const float *src, int64_t n, uint16_t *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(dst + i), h);
    }
    for (; i < n; i++) dst[i] = float_to_half_sw(src[i]);
    return 0;
}
#endif

void qk_f16_to_f32(const void *src, int64_t n, float *dst) {
#if defined(__x86_64__)
    if (have_avx2()) { f16_to_f32_hw(src, n, dst); return; }
#endif
    const uint8_t *s = (const uint8_t *)src;
    for (int64_t i = 0; i < n; i++) { uint16_t h; memcpy(&h, s + 2 * i, 2); dst[i] = half_to_float_sw(h); }
}

int64_t qk_f32_to_f16(const float *src, int64_t n, uint16_t *dst, int saturate) {
#if defined(__x86_64__)
    if (have_avx2()) f32_to_f16_hw(src, n, dst);
    else
#endif
    for (int64_t i = 0; i < n; i++) dst[i] = float_to_half_sw(src[i]);
    // Count finite inputs that became infinite; clamp them when saturating.
    int64_t overflow = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t b; memcpy(&b, &src[i], 4);
        int finite = (b & 0x7f800000u) != 0x7f800000u;
        if (finite && (dst[i] & 0x7fffu) == 0x7c00u) {
            overflow++;
            if (saturate) dst[i] = (uint16_t)((dst[i] & 0x8000u) | 0x7bffu);
        }
    }
    return overflow;
}

void qk_bf16_to_f32(const void *src, int64_t n, float *dst) {
    const uu16 *s = (const uu16 *)src; uint32_t *d = (uint32_t *)dst;
    for (int64_t i = 0; i < n; i++) d[i] = (uint32_t)s[i] << 16;
}

void qk_f32_to_bf16(const float *src, int64_t n, uint16_t *dst) {
    const uint32_t *s = (const uint32_t *)src;
    for (int64_t i = 0; i < n; i++) {
        uint32_t b = s[i];
        if ((b & 0x7fffffffu) > 0x7f800000u) { dst[i] = (uint16_t)((b >> 16) | 0x40u); continue; }  // quiet NaN stays NaN
        b += 0x7fffu + ((b >> 16) & 1u);
        dst[i] = (uint16_t)(b >> 16);
    }
}

void qk_f64_to_f32(const void *src, int64_t n, float *dst) {
    const uf64 *s = (const uf64 *)src;
    for (int64_t i = 0; i < n; i++) dst[i] = (float)s[i];
}

void qk_copy_f32(const void *src, int64_t n, float *dst) { memcpy(dst, src, (size_t)n * 4); }

/* MatMulNBits packing (see MatMulNBitsLayout in OnnxForms.swift). */

void qk_transpose_xor_u8(const uint8_t *src, int64_t rows, int64_t cols, uint8_t x, uint8_t *dst) {
    /* dst[c * rows + r] = src[r * cols + c] ^ x, in tiles for the cache */
    const int64_t T = 64;
    for (int64_t r0 = 0; r0 < rows; r0 += T) {
        int64_t r1 = r0 + T < rows ? r0 + T : rows;
        for (int64_t c0 = 0; c0 < cols; c0 += T) {
            int64_t c1 = c0 + T < cols ? c0 + T : cols;
            /* contiguous writes, strided reads within a tile that stays in the cache */
            for (int64_t c = c0; c < c1; c++) {
                uint8_t *d = dst + c * rows;
                const uint8_t *s = src + c;
                for (int64_t r = r0; r < r1; r++) d[r] = s[r * cols] ^ x;
            }
        }
    }
}

void qk_pack_blocks(const uint8_t *codes, int64_t n, int64_t k, int64_t bs, int bits, const uint8_t *pad, uint8_t *out) {
    /* codes: [n, k] one code per byte; out: [n, blocks, bs * bits / 8]; pad: one code per (row, block) */
    int64_t blocks = (k + bs - 1) / bs;
    int64_t blob = bs * bits / 8;
    for (int64_t row = 0; row < n; row++) {
        const uint8_t *c = codes + row * k;
        uint8_t *o = out + row * blocks * blob;
        for (int64_t b = 0; b < blocks; b++) {
            uint8_t p = pad[row * blocks + b];
            int64_t base = b * bs;
            uint8_t *ob = o + b * blob;
            if (bits == 8) {
                for (int64_t j = 0; j < bs; j++) ob[j] = base + j < k ? c[base + j] : p;
            } else {
                for (int64_t j = 0; j < bs; j += 2) {
                    uint8_t lo = base + j < k ? c[base + j] : p;
                    uint8_t hi = base + j + 1 < k ? c[base + j + 1] : p;
                    ob[j / 2] = (uint8_t)((lo & 0x0F) | (hi << 4));
                }
            }
        }
    }
}
