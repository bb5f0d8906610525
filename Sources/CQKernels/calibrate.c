// Fast range calibration (QUANTIZATION.md section 5): sparse |x| histograms, the
// entropy (KL) and mse objectives evaluated from them, a coarse-to-fine search over
// the candidate thresholds, and order statistics by selection instead of sorting.
//
// The Swift reference (QConvertKit/Quantization/Calibrator.swift) evaluates every
// candidate with a pass over the histogram. Here each objective is evaluated from a
// sparse histogram (only non-empty bins) and the KL divergence is regrouped so that a
// candidate costs one (vectorised) logarithm per non-empty group plus one per distinct bin
// count instead of one per bin. Both search the thresholds coarse to fine unless `exhaustive`
// is set; the tests compare the exhaustive search against the reference and bound the other.
#include "CQKernels.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

// The reference sums in this exact order without fused multiply-adds.
#pragma clang fp contract(off)
#if defined(__FAST_MATH__)
#error "calibrate.c must not be compiled with -ffast-math: the objectives must match the reference"
#endif

#define TALLY_CAP 64

// Natural logarithm of a positive, finite, normal double to within a few ulps, written so that
// loops over arrays of it vectorise (glibc's log does not): x = m * 2^e with m in [sqrt(1/2),
// sqrt(2)), log m = 2 atanh(t) with t = (m - 1) / (m + 1), |t| < 0.172, by its series to t^21
// (truncation below 1e-17 relative).
static inline double log_pos(double x) {
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    // The biased exponent as a double without an integer conversion (which AVX2 lacks for 64 bits).
    const uint64_t ebits = 0x4330000000000000ULL | (bits >> 52);
    double e;
    memcpy(&e, &ebits, sizeof e);
    e -= 4503599627370496.0 + 1023.0;
    const uint64_t mbits = (bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;
    double m;
    memcpy(&m, &mbits, sizeof m);
    const int big = m > 1.4142135623730951;
    m = big ? m * 0.5 : m;
    e = big ? e + 1.0 : e;
    const double t = (m - 1.0) / (m + 1.0);
    const double t2 = t * t;
    double s = 1.0 / 21;
    s = s * t2 + 1.0 / 19;
    s = s * t2 + 1.0 / 17;
    s = s * t2 + 1.0 / 15;
    s = s * t2 + 1.0 / 13;
    s = s * t2 + 1.0 / 11;
    s = s * t2 + 1.0 / 9;
    s = s * t2 + 1.0 / 7;
    s = s * t2 + 1.0 / 5;
    s = s * t2 + 1.0 / 3;
    s = s * t2 + 1.0;
    return e * 0.6931471805599453 + 2.0 * t * s;
}

// Round half to even for |v| < 2^51 by adding and subtracting 1.5 * 2^52 (vectorises, unlike nearbyint
// without SSE4.1); valid in the default rounding mode, which nothing here changes.
static inline double rne(double v) {
    return (v + 6755399441055744.0) - 6755399441055744.0;
}

// The sum of n terms in four interleaved running sums (four independent additions per step instead of
// one chain), added pairwise at the end: deterministic, and within rounding of the sequential sum.
static inline double sum_terms(const double *t, int64_t n) {
    double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    int64_t k = 0;
    for (; k + 4 <= n; k += 4) {
        a0 += t[k];
        a1 += t[k + 1];
        a2 += t[k + 2];
        a3 += t[k + 3];
    }
    for (; k < n; k++) a0 += t[k];
    return (a0 + a1) + (a2 + a3);
}

#if defined(__x86_64__)
static int calib_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2");
    }
    return cached;
}
#define AVX2_CLONE(ret, name, params, args)                                                     \
    static ret name##_body params;                                                              \
    __attribute__((target("avx2"))) static ret name##_avx2 params { return name##_body args; }  \
    static ret name params { return calib_avx2() ? name##_avx2 args : name##_body args; }      \
    static inline __attribute__((always_inline)) ret name##_body params
#else
#define AVX2_CLONE(ret, name, params, args) static inline ret name params
#endif

// ---------------------------------------------------------------- histogram

// Sorts n bin indices below `bins` ascending: insertion sort for a few, else least-significant-digit
// radix sort by bytes through `tmp` (room for n).
static void sort_bins(uint32_t *a, uint32_t *tmp, int64_t n, int64_t bins) {
    if (n <= 32) {
        for (int64_t i = 1; i < n; i++) {
            const uint32_t v = a[i];
            int64_t j = i;
            while (j > 0 && a[j - 1] > v) {
                a[j] = a[j - 1];
                j--;
            }
            a[j] = v;
        }
        return;
    }
    uint32_t *src = a, *dst = tmp;
    for (int shift = 0; shift < 32 && ((uint64_t)(bins - 1) >> shift) > 0; shift += 8) {
        int64_t count[257];
        memset(count, 0, sizeof count);
        for (int64_t i = 0; i < n; i++) count[((src[i] >> shift) & 255) + 1]++;
        for (int d = 0; d < 256; d++) count[d + 1] += count[d];
        for (int64_t i = 0; i < n; i++) dst[count[(src[i] >> shift) & 255]++] = src[i];
        uint32_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != a) memcpy(a, src, (size_t)n * sizeof(uint32_t));
}

// The bin of each value, in a loop that vectorises: the reference's Int(Double(|x|) / width), capped.
AVX2_CLONE(void, bin_indices, (const float *restrict x, int64_t n, double width, int64_t bins, int32_t *restrict out),
           (x, n, width, bins, out)) {
    const double cap = (double)(bins - 1);
    for (int64_t t = 0; t < n; t++) {
        double k = (double)fabsf(x[t]) / width;
        k = k < cap ? k : cap;
        out[t] = (int32_t)k;
    }
}

int64_t qk_sparse_abs_hist(const float *x, int64_t n, float amax, int64_t bins, uint32_t *dense,
                           uint32_t *bin_out, uint32_t *cnt_out) {
    if (n <= 0) return 0;
    if (!(amax > 0)) {
        bin_out[0] = 0;
        cnt_out[0] = (uint32_t)n;
        return 1;
    }
    const double width = (double)amax / (double)bins;
    int64_t nz = 0;
    // `dense` is all zero on entry and on exit. The bin indices are computed a block at a time; bins
    // touched for the first time are listed in bin_out, which is sorted at the end when few bins are
    // touched, or rebuilt by a branch-free pass over every bin otherwise.
    int32_t k[256];
    for (int64_t t0 = 0; t0 < n; t0 += 256) {
        const int64_t len = n - t0 < 256 ? n - t0 : 256;
        bin_indices(x + t0, len, width, bins, k);
        for (int64_t t = 0; t < len; t++) {
            if (dense[k[t]]++ == 0) bin_out[nz++] = (uint32_t)k[t];
        }
    }
    if (nz * 8 < bins) {
        sort_bins(bin_out, cnt_out, nz, bins);
        for (int64_t j = 0; j < nz; j++) {
            cnt_out[j] = dense[bin_out[j]];
            dense[bin_out[j]] = 0;
        }
    } else {
        // j < nz bounds every write to the nz entries the caller has room for.
        int64_t j = 0;
        for (int64_t b = 0; b < bins && j < nz; b++) {
            const uint32_t h = dense[b];
            bin_out[j] = (uint32_t)b;
            cnt_out[j] = h;
            dense[b] = 0;
            j += h != 0;
        }
    }
    return nz;
}

// ---------------------------------------------------------------- objectives

#define DISTINCT 16

typedef struct {
    const uint32_t *bin;   // non-empty bins, ascending
    const uint32_t *cnt;   // their counts
    const int64_t *prefix; // prefix[j] = cnt[0] + ... + cnt[j-1]
    int64_t nz, bins, levels, qmax;
    // Dense form (when most bins are non-empty or there are few levels): mass and non-empty
    // count below each bin, so a group costs two look-ups instead of a pass over its bins.
    double *mass_below;    // [bins + 1]
    double *nz_below;      // [bins + 1]
    // tally[j * DISTINCT + h]: how many of the first j non-empty bins hold exactly h (< DISTINCT)
    int32_t *tally;        // [(nz + 1) * DISTINCT]
    int64_t *heavy;        // sparse indices of bins holding >= DISTINCT, ascending
    int64_t nheavy;
    double *q, *w;         // [levels] per-group scratch
    int32_t *group;        // [nz + 1] group of each non-empty bin, then where each group starts (sparse form)
} objective_ctx;

// Number of non-empty bins below `i`.
static int64_t below(const objective_ctx *c, int64_t i) {
    if (c->nz_below) return (int64_t)c->nz_below[i];
    int64_t lo = 0, hi = c->nz;
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        if ((int64_t)c->bin[mid] < i) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Group g of candidate i covers bins [g*i/L, (g+1)*i/L): its mass and non-empty count, then q (1 for an
// empty group) and the weight of log q (0 for an empty group).
AVX2_CLONE(void, dense_groups, (const double *restrict mass_below, const double *restrict nz_below, int64_t L, int64_t i,
                                double sumQ, double total, double e1P, double e1Q, double *restrict q, double *restrict w),
           (mass_below, nz_below, L, i, sumQ, total, e1P, e1Q, q, w)) {
    const double invQ = 1.0 / sumQ, invT = 1.0 / total;
    if ((L & (L - 1)) == 0 && L * i < (1LL << 31)) {
        // Levels are a power of two (the default, 2^(bits-1)): boundaries by shifts, in 32 bits.
        int shift = 0;
        while ((1LL << shift) < L) shift++;
        const int32_t i32 = (int32_t)i, l32 = (int32_t)L;
        for (int32_t g = 0; g < l32; g++) {
            const int32_t start = (g * i32) >> shift, end = ((g + 1) * i32) >> shift;
            const double mass = mass_below[end] - mass_below[start];
            const double count = nz_below[end] - nz_below[start];
            const int empty = count == 0;
            q[g] = empty ? 1.0 : (mass / count) * invQ - e1Q;
            w[g] = empty ? 0.0 : mass * invT - e1P * count;
        }
        return;
    }
    for (int64_t g = 0; g < L; g++) {
        const int64_t start = g * i / L, end = (g + 1) * i / L;
        const double mass = mass_below[end] - mass_below[start];
        const double count = nz_below[end] - nz_below[start];
        const int empty = count == 0;
        q[g] = empty ? 1.0 : (mass / count) * invQ - e1Q;
        w[g] = empty ? 0.0 : mass * invT - e1P * count;
    }
}

// From each group's mass (in q) and non-empty count (in w): q and the weight of log q, as dense_groups
// makes them; a separate loop so that the divisions pipeline instead of chaining.
AVX2_CLONE(void, group_weights, (double *restrict q, double *restrict w, int64_t n, double sumQ, double total, double e1P,
                                 double e1Q),
           (q, w, n, sumQ, total, e1P, e1Q)) {
    const double invQ = 1.0 / sumQ, invT = 1.0 / total;
    for (int64_t g = 0; g < n; g++) {
        const double mass = q[g], count = w[g];
        q[g] = (mass / count) * invQ - e1Q;
        w[g] = mass * invT - e1P * count;
    }
}

// sum of w[g] * log q[g] (q > 0); q is overwritten with the terms.
AVX2_CLONE(double, weighted_log_sum, (const double *restrict w, double *restrict q, int64_t n), (w, q, n)) {
    for (int64_t g = 0; g < n; g++) q[g] = w[g] * log_pos(q[g]);
    return sum_terms(q, n);
}

// sum of m[k] * p[k] * log p[k] (p > 0).
AVX2_CLONE(double, weighted_plogp_sum, (const double *restrict m, double *restrict p, int64_t n), (m, p, n)) {
    for (int64_t k = 0; k < n; k++) p[k] = m[k] * (p[k] * log_pos(p[k]));
    return sum_terms(p, n);
}

// The group ceil((k + 1) L / i) - 1 of each bin k: quotients of integers below 2^31 by division in
// double; an inexact quotient is at least 1/i below the next integer, far more than its rounding error,
// so truncation gives the integer quotient exactly.
AVX2_CLONE(void, group_of_bins, (const uint32_t *restrict bin, int64_t m, int64_t L, int64_t i, int32_t *restrict group),
           (bin, m, L, i, group)) {
    const double di = (double)i, dl = (double)L, top = (double)(i - 1);
    for (int64_t j = 0; j < m; j++) group[j] = (int32_t)((((double)bin[j] + 1.0) * dl + top) / di) - 1;
}

// KL(P || Q) of candidate i, the reference's definition (see Calibrator.swift), regrouped:
//   KL = sum over bins of p log p  -  sum over non-empty groups of (sum of p in the group) log q_group,
// where every regular bin (non-empty, below i - 1) has p = h / T - e1P and so the first sum needs one
// logarithm per distinct count h. Returns INFINITY for a candidate the reference skips.
static double kl_objective(objective_ctx *c, int64_t i) {
    const double eps = 1e-4;
    const int64_t L = c->levels;
    const int64_t m = below(c, i);
    if (m == 0) return INFINITY;
    const double total = (double)c->prefix[c->nz];
    const double sumQ = (double)c->prefix[m];
    const double outliers = total - sumQ;
    const int last_nz = (int64_t)c->bin[m - 1] == i - 1;
    const int special = !last_nz && outliers > 0;
    const int64_t nQ = m, nP = nQ + special;
    const double e1P = eps * (double)(i - nP) / (double)nP;
    const double e1Q = eps * (double)(i - nQ) / (double)nQ;
    const int64_t regular = last_nz ? m - 1 : m;   // bins whose p is h/T - e1P

    // p log p of the regular bins by distinct count for small counts, one by one for the others, then
    // the bin at i - 1 (which carries the outliers) and the outliers' own bin: gathered with their
    // multiplicities and summed by one vectorised pass.
    double pv[DISTINCT + 2], mv[DISTINCT + 2];
    int64_t np = 0;
    const int32_t *tally = c->tally + regular * DISTINCT;
    for (int h = 1; h < DISTINCT; h++) {
        pv[np] = (double)h / total - e1P;
        mv[np] = (double)tally[h];
        np += tally[h] != 0;
    }
    if (last_nz) {
        pv[np] = ((double)c->cnt[m - 1] + outliers) / total - e1P;
        mv[np++] = 1;
    }
    if (special) {
        pv[np] = outliers / total - e1P;
        mv[np++] = 1;
    }
    double pmin = INFINITY;
    for (int64_t t = 0; t < np; t++) pmin = pv[t] < pmin ? pv[t] : pmin;
    if (!(pmin > 0)) return INFINITY;
    double kl = weighted_plogp_sum(mv, pv, np);
    if (special) kl -= (outliers / total - e1P) * log_pos(eps);
    for (int64_t t = 0; t < c->nheavy && c->heavy[t] < regular; t++) {
        const double p = (double)c->cnt[c->heavy[t]] / total - e1P;
        if (p <= 0) return INFINITY;
        kl += p * log_pos(p);
    }

    // - sum over non-empty groups of (sum of p in the group) * log q_group. Group g covers bins
    // [g*i/L, (g+1)*i/L); bin i - 1 is always in the last group, where p carries the outliers.
    double *q = c->q, *w = c->w;
    int64_t groups = 0;
    if (c->mass_below) {
        dense_groups(c->mass_below, c->nz_below, L, i, sumQ, total, e1P, e1Q, q, w);
        // Only non-empty groups (weight != 0) need a logarithm: pack them to the front.
        for (int64_t g = 0; g < L; g++) {
            q[groups] = q[g];
            w[groups] = w[g];
            groups += w[g] != 0;
        }
    } else {
        // The group of every non-empty bin below i at once (a loop that vectorises), then one pass
        // that sums each run of bins in the same group.
        // Where each group's run of bins starts (a branch-free pass: runs are short and irregular), then
        // each run's mass and length from the prefix sums.
        int32_t *start = c->group;
        group_of_bins(c->bin, m, L, i, start);
        int32_t prev = -1;
        for (int64_t j = 0; j < m; j++) {
            const int32_t g = start[j];
            start[groups] = (int32_t)j;
            groups += g != prev;
            prev = g;
        }
        start[groups] = (int32_t)m;
        // On a sparse histogram most groups hold one bin of count 1, and all of those have the same q
        // and weight: they are counted and take one logarithm between them. The others (and the last
        // group, which the outliers join) are packed into q and w.
        const int64_t *prefix = c->prefix;
        int64_t others = 0, singles = 0;
        for (int64_t g = 0; g < groups - 1; g++) {
            const int64_t len = start[g + 1] - start[g];
            const int64_t mass = prefix[start[g + 1]] - prefix[start[g]];
            const int single = (len == 1) & (mass == 1);
            singles += single;
            q[others] = (double)mass;
            w[others] = (double)len;
            others += !single;
        }
        q[others] = (double)(prefix[start[groups]] - prefix[start[groups - 1]]);
        w[others] = (double)(start[groups] - start[groups - 1]);
        others++;
        group_weights(q, w, others, sumQ, total, e1P, e1Q);
        if (last_nz) w[others - 1] += outliers / total;
        double qmin = INFINITY;
        for (int64_t g = 0; g < others; g++) qmin = q[g] < qmin ? q[g] : qmin;
        double single_term = 0;
        if (singles > 0) {
            const double q1 = (1.0 / sumQ) - e1Q;   // as group_weights makes it for mass 1, count 1
            qmin = q1 < qmin ? q1 : qmin;
            if (q1 > 0) single_term = (double)singles * ((1.0 / total - e1P) * log_pos(q1));
        }
        if (!(qmin > 0)) return INFINITY;
        return kl - (weighted_log_sum(w, q, others) + single_term);
    }
    if (last_nz) w[groups - 1] += outliers / total;
    double qmin = INFINITY;
    for (int64_t g = 0; g < groups; g++) qmin = q[g] < qmin ? q[g] : qmin;
    if (!(qmin > 0)) return INFINITY;
    return kl - weighted_log_sum(w, q, groups);
}

// sum of cnt * (centre - dequantized centre)^2 over the non-empty bins.
AVX2_CLONE(double, mse_sum, (const uint32_t *bin, const uint32_t *cnt, int64_t nz, double step, double qmax),
           (bin, cnt, nz, step, qmax)) {
    // Bin centres exactly between two levels round either way with the same squared error, so
    // multiplying by 1/step instead of dividing changes no term by more than rounding. Terms are
    // made a chunk at a time (a loop that vectorises) and then added in order.
    const double inv = 1.0 / step;
    double err = 0;
    double term[64];
    for (int64_t j0 = 0; j0 < nz; j0 += 64) {
        const int64_t len = nz - j0 < 64 ? nz - j0 : 64;
        const uint32_t *b = bin + j0, *h = cnt + j0;
        for (int64_t l = 0; l < len; l++) {
            const double centre = (double)b[l] + 0.5;
            double q = rne(centre * inv);
            q = q > qmax ? qmax : q;
            const double e = centre - q * step;
            term[l] = (double)h[l] * e * e;
        }
        err += sum_terms(term, len);
    }
    return err;
}

// Expected squared quantize-dequantize error of the bin centres for threshold i (bin units) on a
// symmetric grid of qmax steps.
static double mse_objective(objective_ctx *c, int64_t i) {
    return mse_sum(c->bin, c->cnt, c->nz, (double)i / (double)c->qmax, (double)c->qmax);
}

// ---------------------------------------------------------------- search

typedef double (*objective_fn)(objective_ctx *, int64_t);

typedef struct {
    int64_t i;
    double v;
} cand;

// Keeps the two best candidates seen (smallest value; ties: the larger i). Values within `tie` of the
// best count as equal: the regrouped KL sum leaves rounding noise of about 1e-16 where the reference's
// per-bin terms are exactly zero (P equal to Q), and such ties must still go to the larger i.
static void consider(cand best[2], int64_t i, double v, double tie) {
    const int better = v < best[0].v - tie || (v <= best[0].v + tie && i > best[0].i);
    if (better) {
        if (best[0].i != i) best[1] = best[0];
        best[0].i = i;
        best[0].v = v;
    } else if (i != best[0].i && (v < best[1].v || (v == best[1].v && i > best[1].i))) {
        best[1].i = i;
        best[1].v = v;
    }
}

static void scan(objective_ctx *c, objective_fn f, cand best[2], int64_t lo, int64_t hi, int64_t stride,
                 double tie, int64_t *evaluations) {
    if (lo < c->levels) lo = c->levels;
    if (hi > c->bins) hi = c->bins;
    for (int64_t i = lo; i <= hi; i += stride) {
        consider(best, i, f(c, i), tie);
        (*evaluations)++;
    }
    if (stride > 1 && hi >= lo && (hi - lo) % stride != 0) {
        consider(best, hi, f(c, hi), tie);
        (*evaluations)++;
    }
}

// How a coarse-to-fine search runs: about `coarse` evenly spaced candidates, then passes with the
// stride divided by `refine` around the two best of the first pass and around the `later` best of each
// following pass, down to stride 1.
typedef struct {
    int coarse, refine, later;
} search_plan;

// mse is nearly smooth in the threshold: refining the two best of the first pass, then the best, keeps
// it within 0.25 % of the exhaustive minimum (measured on heavy-tailed rows and groups). The KL divergence is rugged on sparse histograms (a row of 1024 values in 2048
// bins), so no cheap search finds its minimum; one refined candidate gives thresholds whose
// reconstruction error is no worse than the exhaustive minimum's (measured lower), at 1/40 of the cost.
static const search_plan MSE_SEARCH = {32, 8, 1};
static const search_plan KL_SEARCH = {16, 4, 1};

static int64_t search(objective_ctx *c, objective_fn f, double tie, int exhaustive, search_plan plan,
                      int64_t *evaluations) {
    const int64_t lo = c->levels, hi = c->bins;
    cand best[2] = {{hi, INFINITY}, {hi, INFINITY}};
    *evaluations = 0;
    int64_t stride = exhaustive ? 1 : (hi - lo + plan.coarse - 1) / plan.coarse;
    if (stride < 1) stride = 1;
    scan(c, f, best, lo, hi, stride, tie, evaluations);
    for (int pass = 0; stride > 1; pass++) {
        const int64_t next = (stride + plan.refine - 1) / plan.refine;
        const cand around[2] = {best[0], best[1]};
        const int n = pass == 0 ? 2 : plan.later;
        for (int t = 0; t < n; t++) {
            if (!isfinite(around[t].v)) continue;
            scan(c, f, best, around[t].i - stride + next, around[t].i + stride - next, next, tie, evaluations);
        }
        stride = next;
    }
    return isfinite(best[0].v) ? best[0].i : hi;
}

// Scratch for one objective context, sized by the caller (see qk_calib_scratch_doubles).
static void setup(objective_ctx *c, const uint32_t *bin, const uint32_t *cnt, int64_t nz, int64_t *prefix, int64_t bins,
                  int64_t levels, int64_t qmax, double *scratch, int kl) {
    memset(c, 0, sizeof *c);
    c->bin = bin;
    c->cnt = cnt;
    c->prefix = prefix;
    c->nz = nz;
    c->bins = bins;
    c->levels = levels;
    c->qmax = qmax > 0 ? qmax : 1;
    prefix[0] = 0;
    for (int64_t j = 0; j < nz; j++) prefix[j + 1] = prefix[j] + cnt[j];
    if (!kl) return;
    double *d = scratch;
    c->q = d;
    d += levels;
    c->w = d;
    d += levels;
    c->group = (int32_t *)d;
    d += (nz + 2) / 2;
    // Dense look-ups pay for their O(bins) set-up when a candidate's pass over its non-empty
    // bins would cost more than one over its groups.
    if (levels <= nz) {
        c->mass_below = d;
        d += bins + 1;
        c->nz_below = d;
        d += bins + 1;
        // Counts per bin first (zero where empty), then running sums: no branch on the data.
        for (int64_t k = 0; k <= bins; k++) {
            c->mass_below[k] = 0;
            c->nz_below[k] = 0;
        }
        for (int64_t j = 0; j < nz; j++) {
            c->mass_below[bin[j] + 1] = (double)cnt[j];
            c->nz_below[bin[j] + 1] = 1;
        }
        for (int64_t k = 1; k <= bins; k++) {
            c->mass_below[k] += c->mass_below[k - 1];
            c->nz_below[k] += c->nz_below[k - 1];
        }
    }
    c->tally = (int32_t *)d;
    d += ((nz + 1) * DISTINCT + 1) / 2;
    c->heavy = (int64_t *)d;
    int32_t *row = c->tally;
    memset(row, 0, DISTINCT * sizeof(int32_t));
    for (int64_t j = 0; j < nz; j++) {
        int32_t *next = row + DISTINCT;
        memcpy(next, row, DISTINCT * sizeof(int32_t));
        if (cnt[j] < DISTINCT) next[cnt[j]]++;
        else c->heavy[c->nheavy++] = j;
        row = next;
    }
}

int64_t qk_calib_scratch_doubles(int64_t nz, int64_t bins, int64_t levels) {
    return 2 * levels + (nz + 2) / 2 + 2 * (bins + 1) + ((nz + 1) * DISTINCT + 1) / 2 + nz + 8;
}

static int64_t objective_search(const uint32_t *bin, const uint32_t *cnt, int64_t nz, int64_t *prefix, int64_t bins,
                                int64_t levels, int64_t qmax, double *scratch, int kl, int exhaustive,
                                int64_t *evaluations) {
    int64_t dummy = 0;
    if (!evaluations) evaluations = &dummy;
    *evaluations = 0;
    if (bins <= levels || nz <= 0) return bins;
    objective_ctx c;
    setup(&c, bin, cnt, nz, prefix, bins, levels, qmax, scratch, kl);
    if (prefix[nz] <= 0) return bins;
    if (kl) return search(&c, kl_objective, 1e-12, exhaustive, KL_SEARCH, evaluations);
    return search(&c, mse_objective, 0, exhaustive, MSE_SEARCH, evaluations);
}

int64_t qk_entropy_candidate(const uint32_t *bin, const uint32_t *cnt, int64_t nz, int64_t *prefix, int64_t bins,
                             int64_t levels, double *scratch, int exhaustive, int64_t *evaluations) {
    return objective_search(bin, cnt, nz, prefix, bins, levels, 1, scratch, 1, exhaustive, evaluations);
}

int64_t qk_mse_candidate(const uint32_t *bin, const uint32_t *cnt, int64_t nz, int64_t *prefix, int64_t bins,
                         int64_t levels, int64_t qmax, int exhaustive, int64_t *evaluations) {
    return objective_search(bin, cnt, nz, prefix, bins, levels, qmax, NULL, 0, exhaustive, evaluations);
}

double qk_entropy_objective(const uint32_t *bin, const uint32_t *cnt, int64_t nz, int64_t *prefix, int64_t bins,
                            int64_t levels, double *scratch, int64_t i) {
    objective_ctx c;
    setup(&c, bin, cnt, nz, prefix, bins, levels, 1, scratch, 1);
    return kl_objective(&c, i);
}

double qk_mse_objective(const uint32_t *bin, const uint32_t *cnt, int64_t nz, int64_t *prefix, int64_t bins,
                        int64_t levels, int64_t qmax, int64_t i) {
    objective_ctx c;
    setup(&c, bin, cnt, nz, prefix, bins, levels, qmax, NULL, 0);
    return mse_objective(&c, i);
}

// ---------------------------------------------------------------- selection

static inline void swapf(float *a, float *b) {
    float t = *a;
    *a = *b;
    *b = t;
}

// Moves the k-th smallest value to a[k], smaller-or-equal values before it and
// greater-or-equal after (Hoare partitioning around a median of three). Falls back
// to sorting the remaining range when partitioning stops shrinking it fast enough,
// so adversarial inputs stay O(n log n).
static int cmp_f32(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

float qk_select_f32(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    int budget = 2 * 64;
    while (hi > lo) {
        if (hi - lo < 16 || budget-- == 0) {
            qsort(a + lo, (size_t)(hi - lo + 1), sizeof(float), cmp_f32);
            return a[k];
        }
        int64_t mid = lo + ((hi - lo) >> 1);
        if (a[mid] < a[lo]) swapf(&a[mid], &a[lo]);
        if (a[hi] < a[lo]) swapf(&a[hi], &a[lo]);
        if (a[hi] < a[mid]) swapf(&a[hi], &a[mid]);
        const float pivot = a[mid];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                swapf(&a[i], &a[j]);
                i++;
                j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return a[k];
    }
    return a[k];
}

float qk_min_f32(const float *a, int64_t n) {
    float m = a[0];
    for (int64_t t = 1; t < n; t++) m = a[t] < m ? a[t] : m;
    return m;
}

void qk_abs_copy_f32(const float *x, int64_t n, float *out) {
    for (int64_t t = 0; t < n; t++) out[t] = fabsf(x[t]);
}
