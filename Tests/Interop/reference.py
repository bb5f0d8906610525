"""An independent numpy implementation of QUANTIZATION.md, used to judge qconvert's outputs.

Everything is float32 arithmetic as the spec states: scale = alpha / qmax, q = clip(round_half_even(x / scale) + z).
"""
import numpy as np

F32 = np.float32
TINY = np.finfo(np.float32).tiny

RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}
BITS = {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8}


def integer_range(dtype, mapping):
    """mapping: "scale" (restricted symmetric), "scale-full" (symmetric_range: full) or "affine"."""
    qmin, qmax = RANGES[dtype]
    if mapping == "scale-full":
        return qmin, qmax
    if mapping == "scale":
        m = 2 ** (BITS[dtype] - 1) - 1
        return (-m, m) if qmin < 0 else (1, qmax)
    return qmin, qmax


def groups_view(x, granularity, axis, group_size):
    """Returns (blocks, param_shape, expand) where blocks is a list of index arrays per parameter
    in row-major parameter order, and expand(p) broadcasts a parameter array back to x's shape."""
    shape = x.shape
    r = x.ndim
    if granularity == "tensor":
        pshape = [1] * r
    elif granularity == "channel":
        pshape = [1] * r
        pshape[axis] = shape[axis]
    elif granularity == "element":
        pshape = list(shape)
    else:
        gaxis = (r - 2 if axis == r - 1 else r - 1) if r >= 2 else 0
        pshape = list(shape)
        pshape[gaxis] = -(-shape[gaxis] // group_size)

    def expand(p):
        p = np.asarray(p).reshape(pshape)
        if granularity == "group":
            gaxis = (r - 2 if axis == r - 1 else r - 1) if r >= 2 else 0
            p = np.repeat(p, group_size, axis=gaxis)
            p = np.take(p, np.arange(shape[gaxis]), axis=gaxis)
        return np.broadcast_to(p, shape)

    # parameter index of each element
    pid = expand(np.arange(int(np.prod(pshape)), dtype=np.int64))
    return pid, pshape, expand


def percentile_linear(v, p):
    return np.percentile(v.astype(np.float64), p)


def abs_histogram(v, amax, bins):
    hist = np.zeros(bins, dtype=np.float64)
    if amax <= 0:
        hist[0] = v.size
        return hist
    width = float(amax) / bins
    k = np.minimum(np.floor(np.abs(v).astype(np.float64) / width).astype(np.int64), bins - 1)
    np.add.at(hist, k, 1)
    return hist


def _smooth(d, eps=1e-4):
    s = d.sum()
    if s <= 0:
        return None
    d = d / s
    zeros = (d == 0)
    nz = d.size - zeros.sum()
    eps1 = eps * zeros.sum() / nz
    out = np.where(zeros, eps, d - eps1)
    if (out <= 0).any():
        return None
    return out


def entropy_candidate(hist, levels):
    bins = hist.size
    if bins <= levels:
        return bins
    best_i, best = bins, np.inf
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        q = np.zeros(i)
        for g in range(levels):
            a, b = g * i // levels, (g + 1) * i // levels
            seg = hist[a:b]
            nonempty = np.count_nonzero(seg)
            if nonempty:
                q[a:b] = np.where(seg != 0, seg.sum() / nonempty, 0)
        ps, qs = _smooth(p), _smooth(q)
        if ps is None or qs is None:
            continue
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl <= best:
            best, best_i = kl, i
    return best_i


def mse_candidate(hist, levels, qmax):
    bins = hist.size
    if bins <= levels:
        return bins
    centres = np.arange(bins) + 0.5
    mask = hist != 0
    best_i, best = bins, np.inf
    for i in range(levels, bins + 1):
        step = i / qmax
        q = np.minimum(np.round(centres / step), qmax)
        err = float(np.sum((hist * (centres - q * step) ** 2)[mask]))
        if err <= best:
            best, best_i = err, i
    return best_i


def calibrate(v, mapping, calibration, dtype, percentile=99.99, bins=2048, levels=None):
    lo, hi = F32(v.min()), F32(v.max())
    amax = max(abs(lo), abs(hi))
    lv = levels or (128 if dtype.startswith("fp8") else 2 ** (BITS[dtype] - 1))
    if calibration == "max":
        return (-amax, amax) if mapping == "scale" else (lo, hi)
    if calibration == "percentile":
        if mapping == "scale":
            a = F32(percentile_linear(np.abs(v), percentile))
            return -a, a
        return F32(percentile_linear(v, (100 - percentile) / 2)), F32(percentile_linear(v, 100 - (100 - percentile) / 2))
    hist = abs_histogram(v, amax, bins)
    if calibration == "entropy":
        i = entropy_candidate(hist, lv)
    else:
        qsym = 127 if dtype.startswith("fp8") else 2 ** (BITS[dtype] - 1) - 1
        i = mse_candidate(hist, lv, qsym)
    a = F32(float(amax) / bins * i) if amax > 0 else F32(0)
    return (-a, a) if mapping == "scale" else (max(lo, -a), min(hi, a))


def params(beta, alpha, dtype, mapping):
    beta, alpha = F32(beta), F32(alpha)
    if dtype.startswith("fp8"):
        a = max(abs(beta), abs(alpha))
        s = a / F32(448 if dtype == "fp8_e4m3" else 57344)
        return (s if s >= TINY else F32(1)), 0
    qmin, qmax = integer_range(dtype, mapping)
    if mapping == "scale-full":
        # the value of largest magnitude lands on qmin (the scale is negative when that value is positive)
        m = beta if abs(beta) >= abs(alpha) else alpha
        s = m / F32(-((qmax - qmin + 1) // 2))
        return (s if abs(s) >= TINY else F32(1)), (qmin + qmax + 1) // 2
    if mapping == "scale":
        a = max(abs(beta), abs(alpha))
        s = a / F32((qmax - qmin) // 2)
        return (s if s >= TINY else F32(1)), (qmin + qmax) // 2
    b, a = min(beta, F32(0)), max(alpha, F32(0))
    s = (a - b) / F32(qmax - qmin)
    if not s >= TINY:
        return F32(1), (0 if qmin < 0 else qmin)
    z = int(np.clip(F32(qmin) - np.round(b / s), qmin, qmax))
    return s, z


def quantize(x, dtype, mapping="scale", granularity="channel", axis=0, group_size=128, calibration="max", scale_dtype="f32", **cal):
    """Returns (q as int64 array of x's shape, scale array, zero-point array) with parameters in row-major order.
    scale_dtype "bf16" or "f16": scales are rounded to that type (to nearest even) before quantizing with them."""
    x = np.asarray(x, dtype=np.float32)
    pid, pshape, expand = groups_view(x, granularity, axis, group_size)
    n = int(np.prod(pshape))
    scales = np.ones(n, dtype=np.float32)
    zps = np.zeros(n, dtype=np.int64)
    flat, fp = x.reshape(-1), pid.reshape(-1)
    order = np.argsort(fp, kind="stable")
    grouped = flat[order]
    bounds = np.searchsorted(fp[order], np.arange(n + 1))
    if calibration == "max":
        # vectorised min/max per parameter group
        starts = bounds[:-1]
        nonempty = bounds[1:] > starts
        lo = np.minimum.reduceat(grouped, starts[nonempty])
        hi = np.maximum.reduceat(grouped, starts[nonempty])
        for k, b, a in zip(np.flatnonzero(nonempty), lo, hi):
            if mapping == "scale":
                m = max(abs(b), abs(a))
                b, a = -m, m
            scales[k], zps[k] = params(b, a, dtype, mapping)
    else:
        for k in range(n):
            v = grouped[bounds[k]:bounds[k + 1]]
            if v.size == 0:
                continue
            b, a = calibrate(v, mapping, calibration, dtype, **cal)
            scales[k], zps[k] = params(b, a, dtype, mapping)
    if scale_dtype == "bf16":
        scales = (bf16_bits(scales).astype(np.uint32) << 16).view(np.float32)
    elif scale_dtype == "f16":
        scales = scales.astype(np.float16).astype(np.float32)
    s_full, z_full = expand(scales), expand(zps)
    if dtype.startswith("fp8"):
        return fp8_encode(x / s_full, dtype), scales.reshape(pshape), zps.reshape(pshape)
    qmin, qmax = integer_range(dtype, mapping)
    q = np.clip(np.round(x / s_full).astype(np.int64) + z_full, qmin, qmax)
    return q, scales.reshape(pshape), zps.reshape(pshape)


def fp8_values(dtype):
    """Value of every fp8 code (NaN where the code is NaN or infinite)."""
    m, bias = (3, 7) if dtype == "fp8_e4m3" else (2, 15)
    out = np.zeros(256, dtype=np.float64)
    for c in range(256):
        s = -1.0 if c & 0x80 else 1.0
        e, man = (c & 0x7F) >> m, c & ((1 << m) - 1)
        emax = (1 << (7 - m)) - 1
        if dtype == "fp8_e4m3" and e == emax and man == (1 << m) - 1:
            out[c] = np.nan
        elif dtype == "fp8_e5m2" and e == emax:
            out[c] = np.nan
        elif e == 0:
            out[c] = s * man * 2.0 ** (1 - bias - m)
        else:
            out[c] = s * (1 + man / 2 ** m) * 2.0 ** (e - bias)
    return out


def fp8_encode(v, dtype):
    """Nearest finite code, ties to the even code, saturating: brute force over the code table."""
    table = fp8_values(dtype)
    codes = np.array([c for c in range(256) if np.isfinite(table[c])])
    vals = table[codes]
    v64 = np.asarray(v, dtype=np.float32).astype(np.float64).reshape(-1)
    maxv = np.nanmax(vals)
    out = np.zeros(v64.size, dtype=np.uint8)
    for i, x in enumerate(v64):
        x = min(max(x, -maxv), maxv)
        d = np.abs(vals - x)
        best = np.flatnonzero(d == d.min())
        # ties: the code with an even mantissa; among ±0 keep the input's sign
        cand = [c for c in codes[best]]
        even = [c for c in cand if c % 2 == 0] or cand
        c = even[0]
        if x == 0 or (table[c] == 0):
            c = 0x80 if np.signbit(np.float32(v64[i])) else 0
        out[i] = c
    return out.reshape(np.shape(v))


def dequantize(q, scale, zp, shape, granularity, axis, group_size):
    x = np.zeros(shape, dtype=np.float32)
    _, _, expand = groups_view(x, granularity, axis, group_size)
    return ((q.astype(np.int64) - expand(zp)).astype(np.float32) * expand(scale)).astype(np.float32)


def unpack4(packed, shape, signed):
    packed = np.asarray(packed, dtype=np.uint8)
    lo, hi = packed & 0x0F, packed >> 4
    both = np.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))[..., : shape[-1]]
    v = both.astype(np.int64)
    if signed:
        v = np.where(v >= 8, v - 16, v)
    return v.reshape(shape)


def bf16_bits(x):
    b = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((b >> 16) | 0x40).astype(np.uint16), r)
