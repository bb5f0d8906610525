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

// roundf (half away from zero) without a libm call, exact for |v| < 2^31 (block values are within ±128):
// the truncation is exact, and so is the remainder v - trunc(v).
static inline int round_away(float v) {
    int i = (int)v;
    float r = v - (float)i;
    return i + (r >= 0.5f) - (r <= -0.5f);
}

// Error sums kept in registers over a run of blocks, added to the caller's at the end.
typedef struct {
    double x2, e2, xq, q2;
    float max_err;
} sums;

static inline void add(sums *m, float x, float y) {
    double d = (double)x - (double)y;
    m->x2 += (double)x * x;
    m->e2 += d * d;
    m->xq += (double)x * y;
    m->q2 += (double)y * y;
    m->max_err = fmaxf(m->max_err, fabsf(x - y));
}

void qk_quantize_ggml_blocks(const float *x, int64_t blocks, int type, uint8_t *out, qk_metrics *total) {
    sums acc = {0, 0, 0, 0, 0};
    sums *m = &acc;
    for (int64_t b = 0; b < blocks; b++) {
        const float *v = x + b * 32;
        if (type == QK_GGML_Q8_0) {
            uint8_t *o = out + b * 34;
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            store_half(o, d);
            const float dh = load_half(o);
            for (int j = 0; j < 32; j++) {
                const int8_t q = (int8_t)round_away(v[j] * id);
                o[2 + j] = (uint8_t)q;
                add(m, v[j], dh * (float)q);
            }
        } else if (type == QK_GGML_Q4_0) {
            uint8_t *o = out + b * 18;
            // the first value of largest magnitude (numpy's argmax): the maximum first, then its place
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
            int imax = 0;
            while (fabsf(v[imax]) != amax) imax++;
            const float d = v[imax] / -8.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            store_half(o, d);
            const float dh = load_half(o);
            uint8_t q[32];
            for (int j = 0; j < 32; j++) {
                // truncation of a value in [0, 17): the int conversion truncates exactly
                int t = (int)(v[j] * id + 8.5f);
                q[j] = (uint8_t)(t < 0 ? 0 : t > 15 ? 15 : t);
                add(m, v[j], dh * (float)((int)q[j] - 8));
            }
            for (int j = 0; j < 16; j++) o[2 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));
        } else {
            uint8_t *o = out + b * 20;
            float lo = v[0], hi = v[0];
            for (int j = 1; j < 32; j++) {
                lo = fminf(lo, v[j]);
                hi = fmaxf(hi, v[j]);
            }
            const float d = (hi - lo) / 15.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            store_half(o, d);
            store_half(o + 2, lo);
            const float dh = load_half(o), mh = load_half(o + 2);
            uint8_t q[32];
            for (int j = 0; j < 32; j++) {
                int t = (int)((v[j] - lo) * id + 0.5f);
                q[j] = (uint8_t)(t < 0 ? 0 : t > 15 ? 15 : t);
                add(m, v[j], dh * (float)q[j] + mh);
            }
            for (int j = 0; j < 16; j++) o[4 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));
        }
    }
    total->sum_x2 += acc.x2;
    total->sum_e2 += acc.e2;
    total->sum_xq += acc.xq;
    total->sum_q2 += acc.q2;
    if (acc.max_err > total->max_err) total->max_err = acc.max_err;
}
