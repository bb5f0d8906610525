// XXH64, written from the published algorithm description (primes, rounds, avalanche).
#include "CQKernels.h"
#include <string.h>

static const uint64_t P1 = 11400714785074694791ULL;
static const uint64_t P2 = 14029467366897019727ULL;
static const uint64_t P3 = 1609587929392839161ULL;
static const uint64_t P4 = 9650029242287828579ULL;
static const uint64_t P5 = 2870177450012600261ULL;

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t step(uint64_t acc, uint64_t in) { acc += in * P2; acc = rotl64(acc, 31); return acc * P1; }
static inline uint64_t merge(uint64_t h, uint64_t v) { h ^= step(0, v); return h * P1 + P4; }

void qk_xxh64_init(qk_xxh64_state *s) {
    memset(s, 0, sizeof *s);
    s->v[0] = P1 + P2;
    s->v[1] = P2;
    s->v[2] = 0;
    s->v[3] = (uint64_t)0 - P1;
}

static void stripes(qk_xxh64_state *s, const uint8_t *p, size_t n) {
    uint64_t a = s->v[0], b = s->v[1], c = s->v[2], d = s->v[3];
    for (size_t i = 0; i + 32 <= n; i += 32) {
        a = step(a, rd64(p + i));
        b = step(b, rd64(p + i + 8));
        c = step(c, rd64(p + i + 16));
        d = step(d, rd64(p + i + 24));
    }
    s->v[0] = a; s->v[1] = b; s->v[2] = c; s->v[3] = d;
}

void qk_xxh64_update(qk_xxh64_state *s, const void *data, size_t len) {
    const uint8_t *p = (const uint8_t *)data;
    s->total += len;
    if (s->buffered) {
        size_t take = 32 - s->buffered;
        if (take > len) take = len;
        memcpy(s->buf + s->buffered, p, take);
        s->buffered += (uint32_t)take;
        p += take; len -= take;
        if (s->buffered < 32) return;
        stripes(s, s->buf, 32);
        s->buffered = 0;
    }
    size_t whole = len & ~(size_t)31;
    stripes(s, p, whole);
    memcpy(s->buf, p + whole, len - whole);
    s->buffered = (uint32_t)(len - whole);
}

uint64_t qk_xxh64_digest(const qk_xxh64_state *s) {
    uint64_t h;
    if (s->total >= 32) {
        h = rotl64(s->v[0], 1) + rotl64(s->v[1], 7) + rotl64(s->v[2], 12) + rotl64(s->v[3], 18);
        for (int k = 0; k < 4; k++) h = merge(h, s->v[k]);
    } else {
        h = s->v[2] + P5;   // v[2] holds the seed (0)
    }
    h += s->total;
    const uint8_t *p = s->buf;
    size_t n = s->buffered;
    while (n >= 8) { h ^= step(0, rd64(p)); h = rotl64(h, 27) * P1 + P4; p += 8; n -= 8; }
    if (n >= 4) { h ^= (uint64_t)rd32(p) * P1; h = rotl64(h, 23) * P2 + P3; p += 4; n -= 4; }
    while (n > 0) { h ^= (uint64_t)(*p) * P5; h = rotl64(h, 11) * P1; p++; n--; }
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}
