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

static void add(qk_metrics *m, float x, float y) {
    double d = (double)x - (double)y;
    m->sum_x2 += (double)x * x;
    m->sum_e2 += d * d;
    m->sum_xq += (double)x * y;
    m->sum_q2 += (double)y * y;
    float e = fabsf(x - y);
    if (e > m->max_err) m->max_err = e;
}

void qk_quantize_ggml_blocks(const float *x, int64_t blocks, int type, uint8_t *out, qk_metrics *m) {
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
                const int8_t q = (int8_t)roundf(v[j] * id);
                o[2 + j] = (uint8_t)q;
                add(m, v[j], dh * (float)q);
            }
        } else if (type == QK_GGML_Q4_0) {
            uint8_t *o = out + b * 18;
            int imax = 0;
            for (int j = 1; j < 32; j++) if (fabsf(v[j]) > fabsf(v[imax])) imax = j;
            const float d = v[imax] / -8.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            store_half(o, d);
            const float dh = load_half(o);
            uint8_t q[32];
            for (int j = 0; j < 32; j++) {
                float t = truncf(v[j] * id + 8.5f);
                q[j] = (uint8_t)(t < 0.0f ? 0.0f : t > 15.0f ? 15.0f : t);
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
                float t = truncf((v[j] - lo) * id + 0.5f);
                q[j] = (uint8_t)(t < 0.0f ? 0.0f : t > 15.0f ? 15.0f : t);
                add(m, v[j], dh * (float)q[j] + mh);
            }
            for (int j = 0; j < 16; j++) o[4 + j] = (uint8_t)(q[j] | (q[j + 16] << 4));
        }
    }
}
