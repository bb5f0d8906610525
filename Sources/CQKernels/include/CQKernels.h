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

/// llama.cpp's block types for qk_quantize_ggml_blocks.
enum { QK_GGML_Q8_0 = 8, QK_GGML_Q4_0 = 2, QK_GGML_Q4_1 = 3 };
/// `blocks` blocks of 32 floats to Q8_0 (34 bytes each), Q4_0 (18) or Q4_1 (20), byte-identical to
/// llama.cpp's reference quantizer; accumulates the metrics of the reconstruction into `m`.
void qk_quantize_ggml_blocks(const float *x, int64_t blocks, int type, uint8_t *out, qk_metrics *m);

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


// ---- calibration (calibrate.c) ----

/// Histogram of |x| over [0, amax] in `bins` equal bins (the last one closed), returned
/// sparse: the non-empty bins ascending in bin_out and their counts in cnt_out (each with
/// room for min(n, bins) entries); returns how many. `dense` holds `bins` zeros on entry
/// and is left all zero.
int64_t qk_sparse_abs_hist(const float *x, int64_t n, float amax, int64_t bins, uint32_t *dense,
                           uint32_t *bin_out, uint32_t *cnt_out);
/// Doubles of scratch that entropy calibration needs for a histogram of nz non-empty bins.
int64_t qk_calib_scratch_doubles(int64_t nz, int64_t bins, int64_t levels);
/// Entropy (KL) calibration over a sparse histogram: the chosen candidate in [levels, bins]
/// (the threshold in bin widths). `prefix` has room for nz + 1 values, `scratch` for
/// qk_calib_scratch_doubles(nz, bins, levels). `exhaustive` evaluates every candidate; otherwise
/// the search is coarse-to-fine. `evaluations` (may be NULL) receives the number of candidates evaluated.
int64_t qk_entropy_candidate(const uint32_t *bin, const uint32_t *cnt, int64_t nz, int64_t *prefix, int64_t bins,
                             int64_t levels, double *scratch, int exhaustive, int64_t *evaluations);
/// The KL divergence of one candidate (INFINITY where the reference skips it).
double qk_entropy_objective(const uint32_t *bin, const uint32_t *cnt, int64_t nz, int64_t *prefix, int64_t bins,
                            int64_t levels, double *scratch, int64_t i);
/// mse calibration over a sparse histogram, for a symmetric grid of qmax steps.
int64_t qk_mse_candidate(const uint32_t *bin, const uint32_t *cnt, int64_t nz, int64_t *prefix, int64_t bins,
                         int64_t levels, int64_t qmax, int exhaustive, int64_t *evaluations);
/// The expected squared error (in squared bin widths) of one mse candidate.
double qk_mse_objective(const uint32_t *bin, const uint32_t *cnt, int64_t nz, int64_t *prefix, int64_t bins,
                        int64_t levels, int64_t qmax, int64_t i);
/// Partially orders a[0..n) so that a[k] is its k-th smallest value (0-based), the values
/// before it no greater and those after it no smaller; returns a[k]. O(n) expected, O(n log n) worst.
float qk_select_f32(float *a, int64_t n, int64_t k);
/// The smallest of n > 0 values.
float qk_min_f32(const float *a, int64_t n);
/// out[i] = |x[i]|.
void qk_abs_copy_f32(const float *x, int64_t n, float *out);

/// dst[c * rows + r] = src[r * cols + c] ^ x (a byte matrix transposed, each byte xor x).
void qk_transpose_xor_u8(const uint8_t *src, int64_t rows, int64_t cols, uint8_t x, uint8_t *dst);
/// Codes [n, k] (one per byte) into blocks [n, ceil(k/bs), bs*bits/8]: 8-bit as is, 4-bit two per byte
/// (element 2i in the low nibble); the tail of the last block takes pad[row * blocks + block].
void qk_pack_blocks(const uint8_t *codes, int64_t n, int64_t k, int64_t bs, int bits, const uint8_t *pad, uint8_t *out);

/// SHA-256 (sha256.c), streaming; `portable` = 1 forces the plain C rounds (tests compare both).
typedef struct {
    uint32_t h[8];
    uint64_t length;
    uint8_t buf[64];
    size_t fill;
    int portable;
} qk_sha256_state;
void qk_sha256_init(qk_sha256_state *s, int portable);
void qk_sha256_update(qk_sha256_state *s, const void *data, size_t n);
void qk_sha256_final(qk_sha256_state *s, uint8_t out[32]);

/// SIGBUS guard (guard.c): mapped inputs and temporary outputs are registered so that a file
/// truncated under a running conversion ends in one line naming it, temporaries removed, exit 3.
/// `code`: the exit status of a truncated input (ExitStatus.badInput).
void qk_guard_install(int code);
void qk_guard_add_mapping(const void *base, size_t length, const char *path);
void qk_guard_remove_mapping(const void *base);
void qk_guard_add_temp(const char *path);
void qk_guard_remove_temp(const char *path);
/// Atomically swaps two paths (renameat2 with RENAME_EXCHANGE); -1 and errno on failure.
int qk_rename_exchange(const char *from, const char *to);
/// Asks the kernel to send `sig` to this process when its parent dies; 1 if it already has.
int qk_die_with_parent(int sig);

#endif
