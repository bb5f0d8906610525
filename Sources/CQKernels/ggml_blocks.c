// llama.cpp's block formats Q8_0, Q4_0 and Q4_1 (blocks of 32 along a row, float16 scale inside), with
// the float32 arithmetic of its reference quantizer so that blocks are byte-identical to the `gguf`
// package's quantizer: Q8_0 rounds half away from zero (roundf), Q4_0 and Q4_1 truncate after adding
// one half. Error sums of the reconstruction (with the stored float16 scale) go to `m`.
#include "CQKernels.h"
#include <math.h>
#include <string.h>

static void store_half(uint8_t *dst, float v) {
    uint16_t h;
    qk_f32_to_f16(&v, 1, &h, 0);
    dst[0] = (uint8_t)(h & 0xff);
    dst[1] = (uint8_t)(h >> 8);
}

static float load_half(const uint8_t *src) {
    uint16_t h = (uint16_t)(src[0] | (src[1] << 8));
    float f;
    qk_f16_to_f32(&h, 1, &f);
    return f;
}

// Products must round as written (a fused multiply-add would change the blocks' bytes).
#pragma clang fp contract(off)

// Error sums of a run of blocks: each block's sums are taken over eight independent lanes in float
// (so that the compiler vectorises them), then added to double accumulators.
typedef struct {
    double x2, e2, xq, q2;
    float max_err;
} sums;

static inline __attribute__((always_inline)) void add_block(sums *m, const float *x, const float *y) {
    float a[8] = {0}, b[8] = {0}, c[8] = {0}, d[8] = {0}, mx[8] = {0};
    for (int j = 0; j < 32; j += 8) {
        for (int k = 0; k < 8; k++) {
            const float xv = x[j + k], yv = y[j + k], e = xv - yv;
            a[k] += xv * xv;
            b[k] += e * e;
            c[k] += xv * yv;
            d[k] += yv * yv;
            const float ae = e < 0 ? -e : e;
            mx[k] = ae > mx[k] ? ae : mx[k];
        }
    }
    double sa = 0, sb = 0, sc = 0, sd = 0;
    float me = m->max_err;
    for (int k = 0; k < 8; k++) {
        sa += a[k];
        sb += b[k];
        sc += c[k];
        sd += d[k];
        me = mx[k] > me ? mx[k] : me;
    }
    m->x2 += sa;
    m->e2 += sb;
    m->xq += sc;
    m->q2 += sd;
    m->max_err = me;
}

// The largest |v| of a block over eight lanes (NaN-free input: the caller checked).
static inline __attribute__((always_inline)) float block_amax(const float *v) {
    float mx[8] = {0};
    for (int j = 0; j < 32; j += 8)
        for (int k = 0; k < 8; k++) {
            const float a = v[j + k] < 0 ? -v[j + k] : v[j + k];
            mx[k] = a > mx[k] ? a : mx[k];
        }
    float r = 0;
    for (int k = 0; k < 8; k++) r = mx[k] > r ? mx[k] : r;
    return r;
}

#define BLOCKS_BODY                                                                                   \
    sums acc = {0, 0, 0, 0, 0};                                                                       \
    float y[32];                                                                                      \
    for (int64_t b = 0; b < blocks; b++) {                                                            \
        const float *v = x + b * 32;                                                                  \
        if (type == QK_GGML_Q8_0) {                                                                   \
            uint8_t *o = out + b * 34;                                                                \
            const float d = block_amax(v) / 127.0f;                                                   \
            const float id = d != 0.0f ? 1.0f / d : 0.0f;                                             \
            store_half(o, d);                                                                         \
            const float dh = load_half(o);                                                            \
            int8_t q[32];                                                                             \
            for (int j = 0; j < 32; j++) {                                                            \
                /* roundf (half away from zero) without libm: truncation and remainder are exact */  \
                const float t = v[j] * id;                                                            \
                const int i = (int)t;                                                                 \
                const float r = t - (float)i;                                                         \
                q[j] = (int8_t)(i + (r >= 0.5f) - (r <= -0.5f));                                      \
                y[j] = dh * (float)q[j];                                                              \
            }                                                                                         \
            memcpy(o + 2, q, 32);                                                                     \
        } else if (type == QK_GGML_Q4_0) {                                                            \
            uint8_t *o = out + b * 18;                                                                \
            /* the first value of largest magnitude (numpy's argmax): the maximum, then its place */ \
            const float amax = block_amax(v);                                                         \
            int imax = 0;                                                                             \
            while ((v[imax] < 0 ? -v[imax] : v[imax]) != amax) imax++;                                \
            const float d = v[imax] / -8.0f;                                                          \
            const float id = d != 0.0f ? 1.0f / d : 0.0f;                                             \
            store_half(o, d);                                                                         \
            const float dh = load_half(o);                                                            \
            uint8_t q[32];                                                                            \
            for (int j = 0; j < 32; j++) {                                                            \
                /* truncation of a value in [0, 17): the int conversion truncates exactly */         \
                const int t = (int)(v[j] * id + 8.5f);                                                \
                q[j] = (uint8_t)(t < 0 ? 0 : t > 15 ? 15 : t);                                        \
                y[j] = dh * (float)((int)q[j] - 8);                                                   \
            }                                                                                         \
            for (int j = 0; j < 16; j++) o[2 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));              \
        } else {                                                                                      \
            uint8_t *o = out + b * 20;                                                                \
            float lo = v[0], hi = v[0];                                                               \
            for (int j = 1; j < 32; j++) {                                                            \
                lo = v[j] < lo ? v[j] : lo;                                                           \
                hi = v[j] > hi ? v[j] : hi;                                                           \
            }                                                                                         \
            const float d = (hi - lo) / 15.0f;                                                        \
            const float id = d != 0.0f ? 1.0f / d : 0.0f;                                             \
            store_half(o, d);                                                                         \
            store_half(o + 2, lo);                                                                    \
            const float dh = load_half(o), mh = load_half(o + 2);                                     \
            uint8_t q[32];                                                                            \
            for (int j = 0; j < 32; j++) {                                                            \
                const int t = (int)((v[j] - lo) * id + 0.5f);                                         \
                q[j] = (uint8_t)(t < 0 ? 0 : t > 15 ? 15 : t);                                        \
                y[j] = dh * (float)q[j] + mh;                                                         \
            }                                                                                         \
            for (int j = 0; j < 16; j++) o[4 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));              \
        }                                                                                             \
        add_block(&acc, v, y);                                                                        \
    }                                                                                                 \
    total->sum_x2 += acc.x2;                                                                          \
    total->sum_e2 += acc.e2;                                                                          \
    total->sum_xq += acc.xq;                                                                          \
    total->sum_q2 += acc.q2;                                                                          \
    if (acc.max_err > total->max_err) total->max_err = acc.max_err;

static void blocks_generic(const float *x, int64_t blocks, int type, uint8_t *out, qk_metrics *total) {
    BLOCKS_BODY
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) static void blocks_avx2(
    const float *x, int64_t blocks, int type, uint8_t *out, qk_metrics *total) {
    BLOCKS_BODY
}
#endif

void qk_quantize_ggml_blocks(const float *x, int64_t blocks, int type, uint8_t *out, qk_metrics *total) {
#if defined(__x86_64__)
    static int avx2 = -1;
    if (avx2 < 0) {
        __builtin_cpu_init();
        avx2 = __builtin_cpu_supports("avx2");
    }
    if (avx2) {
        blocks_avx2(x, blocks, type, out, total);
        return;
    }
#endif
    blocks_generic(x, blocks, type, out, total);
}
