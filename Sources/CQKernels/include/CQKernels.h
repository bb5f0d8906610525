// Fast numeric kernels for qconvert. Every kernel here has a plain Swift
// reference twin in QConvertKit/Quantization/ReferenceKernels.swift, and the
// tests require both to agree bit for bit. Inputs may be unaligned.
#ifndef CQKERNELS_H
#define CQKERNELS_H
#include <stdint.h>
#include <stddef.h>

/// Error-metric accumulators for one quantized run (see QUANTIZATION.md section 6).
typedef struct {
    double sum_x2;     // sum of x^2
    double sum_e2;     // sum of (x - xhat)^2
    double sum_xq;     // sum of x * xhat
    double sum_q2;     // sum of xhat^2
    float max_err;     // max |x - xhat|
    int64_t clipped;   // elements whose rounded value fell outside [qmin, qmax]
} qk_metrics;

/// min and max of n floats; returns 1 when a NaN or infinity is present (min/max then undefined).
int qk_minmax_f32(const void *x, int64_t n, float *mn, float *mx);

/// q = clamp(round_half_even(x / scale) + zp, qmin, qmax), one byte per element
/// (two's complement for signed types); accumulates metrics of (q - zp) * scale.
void qk_quantize_int_f32(const void *x, int64_t n, float scale, int32_t zp,
                         int32_t qmin, int32_t qmax, uint8_t *out, qk_metrics *m);

/// Same as qk_quantize_int_f32 with one (scale, zp) per element, taken from
/// scales[i] and zps[i] (per-channel on the innermost axis).
void qk_quantize_int_f32_vec(const void *x, int64_t n, const float *scales, const int32_t *zps,
                             int32_t qmin, int32_t qmax, uint8_t *out, qk_metrics *m);

/// IEEE binary16 <-> binary32 (round to nearest even).
void qk_f16_to_f32(const void *src, int64_t n, float *dst);
/// Returns the number of finite inputs that overflowed to infinity.
int64_t qk_f32_to_f16(const float *src, int64_t n, uint16_t *dst, int saturate);
void qk_bf16_to_f32(const void *src, int64_t n, float *dst);
void qk_f32_to_bf16(const float *src, int64_t n, uint16_t *dst);
void qk_f64_to_f32(const void *src, int64_t n, float *dst);
/// Copies n unaligned floats into an aligned buffer.
void qk_copy_f32(const void *src, int64_t n, float *dst);

/// Streaming XXH64 (seed 0): a fast non-cryptographic content hash.
typedef struct {
    uint64_t v[4];
    uint64_t total;
    uint8_t buf[32];
    uint32_t buffered;
} qk_xxh64_state;

void qk_xxh64_init(qk_xxh64_state *s);
void qk_xxh64_update(qk_xxh64_state *s, const void *data, size_t len);
uint64_t qk_xxh64_digest(const qk_xxh64_state *s);

#endif
