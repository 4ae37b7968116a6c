/*
 * Fused selective scan of Mamba-1 on the CPU, float32, h_0 = 0.
 *
 * Symbols (docs/model.md#symbols): B batch, L tokens, D channels, N state size.
 *
 *     delta = softplus(delta_in + delta_bias)     (bias and softplus optional, as in Mamba)
 *     a_t   = exp(delta_t * A)                    (D, N) per (b, t)
 *     h_t   = a_t * h_{t-1} + (delta_t * x_t) Bm_t   h: (D, N) per b
 *     y_t   = <h_t, Cm_t> + Dskip * x_t
 *     out_t = y_t * silu(z_t)                     (gate optional, as in Mamba)
 *
 * Layout: the state is kept as (N, D) per batch element (channels innermost), so
 * every inner loop runs over D contiguous floats and vectorises; sums over N become
 * vector accumulations instead of horizontal reductions. A is therefore passed
 * transposed, AT: (N, D), and its gradient comes back as (N, D).
 *
 * exp, log1p and the sigmoid are inlined polynomial versions (below) so that GCC
 * vectorises them with the loops around them: a call into libm, or even into glibc's
 * vector libmvec, costs more than the rest of the update.
 *
 * Backward: the exact reverse recurrence. For each batch element the forward is
 * recomputed into a scratch of h_t and a_t for all t (2 * L * N * D floats; 196 KB at
 * L = 24, D = 64, N = 16, so it stays in L2) and then walked backwards:
 *
 *     dh_t    = dy_t Cm_t + a_{t+1} * dh_{t+1}                  (the "carry")
 *     dCm_t   = sum_d dy_t h_t           dBm_t = sum_d dh_t delta_t x_t
 *     q_t     = dh_t * a_t * h_{t-1}     (gradient w.r.t. delta_t * A)
 *     ddelta  = sum_n q_t A + sum_n dh_t Bm_t x_t
 *     dx      = sum_n dh_t Bm_t delta_t + Dskip dy_t
 *     dA     += q_t delta_t              dDskip += dy_t x_t
 *
 * Recomputing costs less than storing: keeping h_t and a_t of every layer from the
 * forward to the backward would be 12.6 MB per layer, written and read back through
 * memory, against one more pass over data that stays in L2.
 *
 * Threads: the batch is cut into fixed work items shared out by a small pthread pool
 * (see "work distribution"); sums over the batch are added per item in item order, so
 * results are bitwise the same for any thread count. No OpenMP runtime is linked (torch
 * ships its own), only -fopenmp-simd for the `omp simd` hints.
 *
 * Build flags must not include -ffast-math / -fassociative-math: the magic-number
 * rounding in exp2_fast ((v + M) - M) would be folded away, and crtfastmath.o would turn
 * on flush-to-zero for the whole process.
 *
 * Entry points return 0 on success and DMM_SCAN_ENOMEM when memory runs out.
 */

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DMM_SCAN_ENOMEM 1
#define DMM_SCAN_MAX_THREADS 64

/* ---- vectorisable elementary functions --------------------------------------------- */

#define LOG2E 1.44269504088896341f
#define LN2 0.693147180559945309f
#define LN2_HI 0.693359375f /* ln 2 split for Cody-Waite reduction: LN2_HI + LN2_LO */
#define LN2_LO -2.12194440e-4f
#define SQRT2 1.41421356237309505f
/* 2^k stays a normal float for integers k in [-126, 127]: exp2 arguments are clamped to
 * [EXP2_MIN_ARG, EXP2_MAX_ARG] and exp arguments to [EXP_MIN_ARG, EXP_MAX_ARG], so tiny
 * results come out at about 1e-38 instead of 0 (below anything the scan can resolve)
 * and nothing overflows to inf. */
#define EXP2_MIN_ARG -126.0f
#define EXP2_MAX_ARG 127.0f
#define EXP_MIN_ARG -87.33f
#define EXP_MAX_ARG 88.02f
/* 1.5 * 2^23: adding it to |v| < 2^22 rounds v to an integer (to nearest, as the FPU
 * rounds) and leaves that integer in the low mantissa bits. */
#define ROUND_MAGIC 12582912.0f
/* PyTorch's softplus threshold (beta = 1): above it softplus(v) = v. */
#define SOFTPLUS_THRESHOLD 20.0f

static inline float bits_to_float(uint32_t bits) {
    union {
        uint32_t i;
        float f;
    } u = {.i = bits};
    return u.f;
}

static inline uint32_t float_to_bits(float value) {
    union {
        float f;
        uint32_t i;
    } u = {.f = value};
    return u.i;
}

/* 2^v: v = k + r with k an integer and |r| <= 1/2; 2^r by a degree-6 polynomial fitted
 * on [-1/2, 1/2] (max relative error 1.1e-7 in float arithmetic). k comes from the
 * round-to-nearest of adding ROUND_MAGIC, and 2^k is applied by adding k to the exponent
 * bits: integer work, which leaves the FMA units (the bottleneck here) to the polynomial.
 * At the lower clamp this can land in the denormal range with a meaningless mantissa; the
 * value is below 1.2e-38 either way. */
static inline float exp2_fast(float v) {
    v = v < EXP2_MIN_ARG ? EXP2_MIN_ARG : v;
    v = v > EXP2_MAX_ARG ? EXP2_MAX_ARG : v;
    const float shifted = v + ROUND_MAGIC; /* needs no reassociation: see the build flags */
    const float r = v - (shifted - ROUND_MAGIC);
    float p = 1.5467364573851228e-4f;
    p = p * r + 1.3400432653725147e-3f;
    p = p * r + 9.618035517632961e-3f;
    p = p * r + 5.550327152013779e-2f;
    p = p * r + 2.4022650718688965e-1f;
    p = p * r + 6.931471824645996e-1f;
    p = p * r + 1.0f;
    /* the low bits of `shifted` hold k (two's complement), shifted left into the exponent */
    return bits_to_float(float_to_bits(p) + (float_to_bits(shifted) << 23));
}

/* e^v: Cody-Waite reduction v = k ln2 + r, |r| <= ln2 / 2, and Cephes' expf polynomial
 * for e^r (about 1 ulp over the clamped range). */
static inline float exp_fast(float v) {
    v = v < EXP_MIN_ARG ? EXP_MIN_ARG : v;
    v = v > EXP_MAX_ARG ? EXP_MAX_ARG : v;
    const float shifted = v * LOG2E + ROUND_MAGIC; /* k = round(v / ln 2) in the low bits */
    const float k = shifted - ROUND_MAGIC;
    const float r = (v - k * LN2_HI) - k * LN2_LO;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return bits_to_float(float_to_bits(p) + (float_to_bits(shifted) << 23));
}

/* ln(1 + f) for f in [sqrt(1/2) - 1, sqrt(2) - 1]: Cephes' logf polynomial (about 1 ulp). */
static inline float log1p_reduced(float f) {
    const float f2 = f * f;
    float p = 7.0376836292e-2f;
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    return (p * f * f2 - 0.5f * f2) + f;
}

/* ln(u) for a positive normal u: u = m 2^e with m in [sqrt(1/2), sqrt(2)). */
static inline float log_fast(float u) {
    const uint32_t bits = float_to_bits(u);
    float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u); /* [1, 2) */
    float e = (float)((int32_t)((bits >> 23) & 0xffu) - 127);
    const int high = m > SQRT2;
    m = high ? 0.5f * m : m;
    e = high ? e + 1.0f : e;
    return log1p_reduced(m - 1.0f) + e * LN2;
}

/* ln(1 + e) for e >= 0, accurate for tiny e: the polynomial directly while e is in its
 * range, else ln of the rounded 1 + e (relative error below 2e-7 there). */
static inline float log1p_fast(float e) {
    return e <= SQRT2 - 1.0f ? log1p_reduced(e) : log_fast(1.0f + e);
}

/* PyTorch's softplus with beta = 1 and threshold 20. */
static inline float softplus_fast(float v) {
    return v > SOFTPLUS_THRESHOLD ? v : log1p_fast(exp_fast(v));
}

/* d softplus / dv, as PyTorch's softplus_backward computes it. */
static inline float softplus_grad_fast(float v) {
    const float e = exp_fast(v);
    return v > SOFTPLUS_THRESHOLD ? 1.0f : e / (e + 1.0f);
}

static inline float sigmoid_fast(float v) { return 1.0f / (1.0f + exp_fast(-v)); }

/* ---- the scan --------------------------------------------------------------------- */

typedef struct {
    /* inputs */
    const float *x, *delta_in, *delta_bias, *AT, *Bm, *Cm, *Dskip, *z, *dout;
    int delta_softplus;
    /* forward outputs: out, and delta when it differs from delta_in */
    float *out, *delta;
    /* backward outputs */
    float *dx, *ddelta_in, *dAT, *dBm, *dCm, *dDskip, *dz, *ddelta_bias;
    int64_t L, D, N;
    /* Bm, Cm and z may be views into wider rows (the splits of x_proj's and in_proj's
     * outputs): their rows (b, t) start stride_* floats apart; all else is contiguous. */
    int64_t stride_B, stride_C, stride_z;
    int64_t b_begin, b_end; /* this work item's batch elements */
} scan_job;

/* delta = softplus?(delta_in + bias) for one (L, D) slab. */
static void prepare_delta(const scan_job *job, const float *restrict delta_in, float *restrict delta) {
    const int64_t D = job->D;
    const float *restrict bias = job->delta_bias;
    for (int64_t t = 0; t < job->L; ++t) {
        const float *restrict in_t = delta_in + t * D;
        float *restrict out_t = delta + t * D;
        if (bias != NULL) {
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) out_t[d] = in_t[d] + bias[d];
        } else {
            memcpy(out_t, in_t, (size_t)D * sizeof(float));
        }
        if (job->delta_softplus) {
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) out_t[d] = softplus_fast(out_t[d]);
        }
    }
}

/* A * log2(e), (N, D), so that the decay is one multiply and an exp2. */
static void scale_A(const float *restrict AT, float *restrict AT2, int64_t count) {
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) AT2[k] = AT[k] * LOG2E;
}

/* Forward of one batch element: y (or the gated output) into out, the state h: (N, D)
 * updated in place. */
static void forward_out(const float *restrict x, const float *restrict delta, const float *restrict AT2,
                        const float *restrict Bm, const float *restrict Cm, const float *restrict Dskip,
                        const float *restrict z, float *restrict out, float *restrict h, float *restrict drive,
                        int64_t L, int64_t D, int64_t N, int64_t sB, int64_t sC, int64_t sz) {
    memset(h, 0, (size_t)(N * D) * sizeof(float));
    for (int64_t t = 0; t < L; ++t) {
        const float *restrict xt = x + t * D;
        const float *restrict dt = delta + t * D;
        float *restrict yt = out + t * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
            drive[d] = dt[d] * xt[d];
            yt[d] = Dskip[d] * xt[d];
        }
        for (int64_t n = 0; n < N; ++n) {
            const float bn = Bm[t * sB + n];
            const float cn = Cm[t * sC + n];
            const float *restrict an = AT2 + n * D;
            float *restrict hn = h + n * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
                const float next = exp2_fast(dt[d] * an[d]) * hn[d] + drive[d] * bn;
                hn[d] = next;
                yt[d] += next * cn;
            }
        }
        if (z != NULL) {
            const float *restrict zt = z + t * sz;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) yt[d] *= zt[d] * sigmoid_fast(zt[d]);
        }
    }
}

/* Forward of one batch element keeping every h_t and a_t: hs[t], as[t]: (N, D) for
 * t < L, from h_{-1} = zero_state (N * D zeros). */
static void forward_store(const float *restrict x, const float *restrict delta, const float *restrict AT2,
                          const float *restrict Bm, const float *restrict zero_state, float *restrict hs,
                          float *restrict as, float *restrict drive, int64_t L, int64_t D, int64_t N,
                          int64_t sB) {
    const int64_t ND = N * D;
    for (int64_t t = 0; t < L; ++t) {
        const float *restrict xt = x + t * D;
        const float *restrict dt = delta + t * D;
        const float *restrict prev = t > 0 ? hs + (t - 1) * ND : zero_state;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) drive[d] = dt[d] * xt[d];
        for (int64_t n = 0; n < N; ++n) {
            const float bn = Bm[t * sB + n];
            const float *restrict an = AT2 + n * D;
            const float *restrict hp = prev + n * D;
            float *restrict hn = hs + t * ND + n * D;
            float *restrict at = as + t * ND + n * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
                const float decay = exp2_fast(dt[d] * an[d]);
                at[d] = decay;
                hn[d] = decay * hp[d] + drive[d] * bn;
            }
        }
    }
}

/* The per-(t, d) factors of the backward, in time order (so that the inputs stream
 * forwards from memory; walking them backwards in the reverse loop stalled on misses):
 * gs[t] = dy_t, the gradient reaching y (dout, or dout silu(z) with the gate, which also
 * writes dz = dout y silu'(z)); with the softplus, ps[t] = softplus'(delta_in + bias). */
static void backward_factors(const scan_job *job, int64_t b, const float *restrict hs, float *restrict gs,
                             float *restrict ps, float *restrict y_row) {
    const int64_t L = job->L, D = job->D, N = job->N, ND = N * D;
    const float *restrict dout = job->dout + b * L * D;
    const float *restrict bias = job->delta_bias;
    for (int64_t t = 0; t < L; ++t) {
        const float *restrict dot = dout + t * D;
        float *restrict gt = gs + t * D;
        if (job->z != NULL) {
            const float *restrict xt = job->x + (b * L + t) * D;
            const float *restrict ct = job->Cm + (b * L + t) * job->stride_C;
            const float *restrict zt = job->z + (b * L + t) * job->stride_z;
            float *restrict dzt = job->dz + (b * L + t) * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) y_row[d] = job->Dskip[d] * xt[d];
            for (int64_t n = 0; n < N; ++n) {
                const float *restrict hn = hs + t * ND + n * D;
                const float cn = ct[n];
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) y_row[d] += hn[d] * cn;
            }
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
                const float s = sigmoid_fast(zt[d]);
                gt[d] = dot[d] * zt[d] * s;
                dzt[d] = dot[d] * y_row[d] * s * (1.0f + zt[d] * (1.0f - s));
            }
        } else {
            memcpy(gt, dot, (size_t)D * sizeof(float));
        }
        if (job->delta_softplus) {
            const float *restrict in_t = job->delta_in + (b * L + t) * D;
            float *restrict pt = ps + t * D;
            if (bias != NULL) {
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) pt[d] = softplus_grad_fast(in_t[d] + bias[d]);
            } else {
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) pt[d] = softplus_grad_fast(in_t[d]);
            }
        }
    }
}

static int forward_chunk(scan_job *job) {
    const int64_t L = job->L, D = job->D, N = job->N;
    const int own_delta = job->delta == NULL && (job->delta_bias != NULL || job->delta_softplus);
    /* state (N, D), AT2 (N, D), drive (D,), and a delta slab (L, D) when the caller keeps none */
    float *scratch = malloc((size_t)(2 * N * D + D + (own_delta ? L * D : 0)) * sizeof(float));
    if (scratch == NULL) return DMM_SCAN_ENOMEM;
    float *state = scratch;
    float *AT2 = state + N * D;
    float *drive = AT2 + N * D;
    float *delta_slab = drive + D;
    scale_A(job->AT, AT2, N * D);
    for (int64_t b = job->b_begin; b < job->b_end; ++b) {
        const float *delta;
        if (job->delta_bias == NULL && !job->delta_softplus) {
            delta = job->delta_in + b * L * D;
        } else {
            float *target = own_delta ? delta_slab : job->delta + b * L * D;
            prepare_delta(job, job->delta_in + b * L * D, target);
            delta = target;
        }
        forward_out(job->x + b * L * D, delta, AT2, job->Bm + b * L * job->stride_B, job->Cm + b * L * job->stride_C,
                    job->Dskip, job->z != NULL ? job->z + b * L * job->stride_z : NULL, job->out + b * L * D, state,
                    drive, L, D, N, job->stride_B, job->stride_C, job->stride_z);
    }
    free(scratch);
    return 0;
}

/* The reverse step in explicit vectors of VEC channels (GCC vector extensions; split into
 * two AVX or four SSE registers on narrower targets). Explicit because dCm and dBm are
 * sums over channels: under `omp simd reduction` GCC ends every row with VEC dependent
 * scalar adds (it may not reassociate without -fassociative-math, which the elementwise
 * functions above must not get), and those cost more than the rest of the row. */
#if defined(__AVX512F__)
#define VEC 16
#elif defined(__AVX__)
#define VEC 8
#else
#define VEC 4
#endif
typedef float vecf __attribute__((vector_size(VEC * sizeof(float))));
typedef float vec4 __attribute__((vector_size(4 * sizeof(float))));

static inline vecf vload(const float *p) {
    vecf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vecf v) { memcpy(p, &v, sizeof v); }

/* Sum of the lanes as a tree of halves. */
static inline float vsum(vecf v) {
    float lanes[VEC];
    memcpy(lanes, &v, sizeof v);
#if VEC >= 8
    for (int width = VEC / 2; width >= 4; width /= 2) {
        for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
    }
#endif
    vec4 s4;
    memcpy(&s4, lanes, sizeof s4);
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* One reverse step of state row n over the D channels (the recurrences in the header):
 * carry, sum_b (sum_n dh Bm), ddt and dan are updated in place; dCm and dBm of the row
 * are written to *dc_out and *db_out. */
static inline void reverse_row(int64_t D, float cn, float bn, const float *restrict g, const float *restrict ht,
                               const float *restrict hp, const float *restrict at, const float *restrict an,
                               const float *restrict drive, const float *restrict dt, float *restrict cr,
                               float *restrict sum_b, float *restrict ddt, float *restrict dan,
                               float *restrict dc_out, float *restrict db_out) {
    vecf dc_lanes = {0.0f};
    vecf db_lanes = {0.0f};
    int64_t d = 0;
    for (; d + VEC <= D; d += VEC) {
        const vecf gv = vload(g + d);
        const vecf atv = vload(at + d);
        const vecf dh = vload(cr + d) + gv * cn;
        const vecf q = dh * atv * vload(hp + d);
        dc_lanes += gv * vload(ht + d);
        db_lanes += dh * vload(drive + d);
        vstore(sum_b + d, vload(sum_b + d) + dh * bn);
        vstore(ddt + d, vload(ddt + d) + q * vload(an + d));
        vstore(dan + d, vload(dan + d) + q * vload(dt + d));
        vstore(cr + d, atv * dh);
    }
    float dc = vsum(dc_lanes);
    float db = vsum(db_lanes);
    for (; d < D; ++d) { /* the same, one channel at a time */
        const float dh = cr[d] + g[d] * cn;
        const float q = dh * at[d] * hp[d];
        dc += g[d] * ht[d];
        db += dh * drive[d];
        sum_b[d] += dh * bn;
        ddt[d] += q * an[d];
        dan[d] += q * dt[d];
        cr[d] = at[d] * dh;
    }
    *dc_out = dc;
    *db_out = db;
}

static int backward_chunk(scan_job *job) {
    const int64_t L = job->L, D = job->D, N = job->N, ND = N * D;
    /* hs, as: (L, N, D); gs, ps: (L, D); carry, zero_state, AT2: (N, D); drive, sum_b,
     * y_row: (D,) */
    float *scratch = malloc((size_t)(2 * L * ND + 2 * L * D + 3 * ND + 3 * D) * sizeof(float));
    if (scratch == NULL) return DMM_SCAN_ENOMEM;
    float *hs = scratch;
    float *as = hs + L * ND;
    float *gs = as + L * ND;
    float *ps = gs + L * D;
    float *carry = ps + L * D;
    float *zero_state = carry + ND; /* h_{-1} */
    float *AT2 = zero_state + ND;
    float *drive = AT2 + ND;
    float *sum_b = drive + D;
    float *y_row = sum_b + D;
    memset(zero_state, 0, (size_t)ND * sizeof(float));
    scale_A(job->AT, AT2, ND);
    float *restrict dAT = job->dAT;           /* this item's partial (N, D), zeroed by the caller */
    float *restrict dDskip = job->dDskip;     /* this item's partial (D,), zeroed by the caller */
    float *restrict dbias = job->ddelta_bias; /* this item's partial (D,) or NULL */
    const float *restrict AT = job->AT;
    const float *restrict Dskip = job->Dskip;

    for (int64_t b = job->b_begin; b < job->b_end; ++b) {
        const float *restrict x = job->x + b * L * D;
        const float *restrict delta = job->delta + b * L * D; /* the forward's delta */
        const float *restrict Bm = job->Bm + b * L * job->stride_B;
        const float *restrict Cm = job->Cm + b * L * job->stride_C;
        float *restrict dx = job->dx + b * L * D;
        float *restrict ddelta = job->ddelta_in + b * L * D;
        float *restrict dBm = job->dBm + b * L * N;
        float *restrict dCm = job->dCm + b * L * N;

        forward_store(x, delta, AT2, Bm, zero_state, hs, as, drive, L, D, N, job->stride_B);
        backward_factors(job, b, hs, gs, ps, y_row);
        memset(carry, 0, (size_t)ND * sizeof(float));

        for (int64_t t = L - 1; t >= 0; --t) {
            const float *restrict xt = x + t * D;
            const float *restrict dt = delta + t * D;
            const float *restrict g = gs + t * D;
            float *restrict dxt = dx + t * D;
            float *restrict ddt = ddelta + t * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
                drive[d] = dt[d] * xt[d];
                sum_b[d] = 0.0f;
                ddt[d] = 0.0f;
                dDskip[d] += g[d] * xt[d];
            }
            for (int64_t n = 0; n < N; ++n) {
                const float bn = Bm[t * job->stride_B + n];
                const float cn = Cm[t * job->stride_C + n];
                const float *restrict ht = hs + t * ND + n * D;
                const float *restrict hp = (t > 0 ? hs + (t - 1) * ND : zero_state) + n * D;
                const float *restrict at = as + t * ND + n * D;
                const float *restrict an = AT + n * D;
                float *restrict cr = carry + n * D;
                float *restrict dan = dAT + n * D;
                reverse_row(D, cn, bn, g, ht, hp, at, an, drive, dt, cr, sum_b, ddt, dan, &dCm[t * N + n],
                            &dBm[t * N + n]);
            }
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
                ddt[d] += sum_b[d] * xt[d];
                dxt[d] = sum_b[d] * dt[d] + Dskip[d] * g[d];
            }
            if (job->delta_softplus) { /* back through softplus(delta_in + bias) */
                const float *restrict pt = ps + t * D;
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) ddt[d] *= pt[d];
            }
            if (dbias != NULL) {
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) dbias[d] += ddt[d];
            }
        }
    }
    free(scratch);
    return 0;
}

/* ---- work distribution ----------------------------------------------------------- */

/* The batch is cut into work items of CHUNK_BATCH elements, whatever the thread count,
 * and the backward's sums over the batch (dA, dDskip, d delta_bias) are kept per item and
 * added in item order: results are bitwise the same for any thread count and schedule
 * (exact resume of a training run does not depend on how busy the machine was). */
#define CHUNK_BATCH 4
typedef int (*chunk_fn)(scan_job *);

/*
 * A small persistent pool of helper threads. Items are claimed through one atomic
 * ticket (call generation in the high bits, next item in the low bits), so the calling
 * thread starts at once and a helper that is woken late simply finds nothing left; the
 * caller then waits only for items already claimed, and is never much slower than alone.
 * Helpers spin spin_ns after a call (back-to-back calls skip the wake-up), then sleep:
 * spinning longer kept a core busy between the scans of a training step, which on a
 * machine shared with another job took CPU time from the calling thread itself. The
 * caller, once its own items are done, spins as long for the items helpers still hold,
 * then sleeps until the last one ends: a helper preempted mid-item (another process took
 * its core) would otherwise cost the caller a whole time slice of spinning. spin_ns = 0
 * (dmm_selective_scan_set_spin_ns) makes both sleep at once; the Python side sets it
 * whenever torch runs its own multi-threaded pool, so two pools never spin at once. The
 * pool is re-created after fork(); threads are not pinned.
 */
#define SPIN_NS 200000LL
static _Atomic int64_t spin_ns = SPIN_NS;

void dmm_selective_scan_set_spin_ns(int64_t ns) { atomic_store(&spin_ns, ns < 0 ? 0 : ns); }
int64_t dmm_selective_scan_get_spin_ns(void) { return atomic_load(&spin_ns); }
#define POOL_MAX_HELPERS (DMM_SCAN_MAX_THREADS - 1)
/* ticket = call generation (24 bits) | item count (20 bits) | next item (20 bits): the
 * count travels with the generation, so a helper still holding an old generation can
 * never claim an item of a newer call. Calls with more items run on the caller alone. */
#define TICKET_BITS 20
#define TICKET_MASK ((1ULL << TICKET_BITS) - 1)
#define GENERATION_MASK 0xffffffULL

static struct {
    pthread_mutex_t call_lock; /* one pooled call at a time; others run inline */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    pthread_cond_t done;       /* the caller sleeps on it for items helpers still hold */
    _Atomic int caller_waiting;
    int n_helpers;
    _Atomic int active_helpers; /* helpers with an index below this take part in the call */
    _Atomic int sleeping;
    _Atomic uint32_t generation;
    _Atomic uint64_t ticket; /* see ticket_make */
    _Atomic int64_t items_done;
    _Atomic int status;
    chunk_fn fn;
    scan_job *jobs;
} pool = {.call_lock = PTHREAD_MUTEX_INITIALIZER, .sleep_lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER, .done = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline uint64_t ticket_make(uint32_t generation, int64_t n_items) {
    return (((uint64_t)generation & GENERATION_MASK) << (2 * TICKET_BITS)) | ((uint64_t)n_items << TICKET_BITS);
}

/* Claims and runs items of call `generation` until none is left. */
static void run_items(uint32_t generation) {
    for (;;) {
        uint64_t ticket = atomic_load_explicit(&pool.ticket, memory_order_acquire);
        if ((ticket >> (2 * TICKET_BITS)) != ((uint64_t)generation & GENERATION_MASK)) return;
        const int64_t n_items = (int64_t)((ticket >> TICKET_BITS) & TICKET_MASK);
        const int64_t item = (int64_t)(ticket & TICKET_MASK);
        if (item >= n_items) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.ticket, &ticket, ticket + 1, memory_order_acq_rel,
                                                   memory_order_relaxed)) {
            continue;
        }
        /* The item is ours: the caller waits for it, so fn and jobs stay valid. */
        const int status = pool.fn(&pool.jobs[item]);
        if (status != 0) atomic_store(&pool.status, status);
        /* seq_cst with the caller's store of caller_waiting: one of the two sees the other's write. */
        if (atomic_fetch_add(&pool.items_done, 1) + 1 == n_items && atomic_load(&pool.caller_waiting)) {
            pthread_mutex_lock(&pool.sleep_lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.sleep_lock);
        }
    }
}

static void *helper_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&pool.generation);
    for (;;) {
        uint32_t generation = atomic_load_explicit(&pool.generation, memory_order_acquire);
        const int64_t spin_start = now_ns();
        const int64_t spin_limit = atomic_load_explicit(&spin_ns, memory_order_relaxed);
        for (int64_t spins = 0; generation == seen; ++spins) {
            if (spin_limit > 0) cpu_relax();
            generation = atomic_load_explicit(&pool.generation, memory_order_acquire);
            if (generation == seen && (spin_limit == 0 || ((spins & 1023) == 1023 &&
                                                           now_ns() - spin_start > spin_limit))) {
                pthread_mutex_lock(&pool.sleep_lock);
                atomic_fetch_add(&pool.sleeping, 1);
                while ((generation = atomic_load(&pool.generation)) == seen) {
                    pthread_cond_wait(&pool.wake, &pool.sleep_lock);
                }
                atomic_fetch_sub(&pool.sleeping, 1);
                pthread_mutex_unlock(&pool.sleep_lock);
            }
        }
        seen = generation;
        if (index < atomic_load(&pool.active_helpers)) run_items(generation);
    }
    return NULL;
}

static void pool_after_fork_in_child(void) {
    /* The helpers do not exist in the child; start over. */
    pthread_mutex_init(&pool.call_lock, NULL);
    pthread_mutex_init(&pool.sleep_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    atomic_store(&pool.caller_waiting, 0);
    pool.n_helpers = 0;
    atomic_store(&pool.sleeping, 0);
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_register_fork_handler(void) { pthread_atfork(NULL, NULL, pool_after_fork_in_child); }

/* Starts helpers up to `wanted` (with pool.call_lock held); returns how many exist. */
static int pool_grow(int wanted) {
    pthread_once(&pool_once, pool_register_fork_handler);
    if (wanted > POOL_MAX_HELPERS) wanted = POOL_MAX_HELPERS;
    while (pool.n_helpers < wanted) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, helper_main, (void *)(intptr_t)pool.n_helpers);
        pthread_attr_destroy(&attr);
        if (failed) break;
        ++pool.n_helpers;
    }
    return pool.n_helpers;
}

/* The caller's wait for the items helpers still run: spin up to spin_ns, then sleep on `done`. */
static void wait_for_items(int64_t n_items) {
    const int64_t spin_limit = atomic_load_explicit(&spin_ns, memory_order_relaxed);
    const int64_t spin_start = spin_limit > 0 ? now_ns() : 0;
    for (int64_t spins = 1; atomic_load_explicit(&pool.items_done, memory_order_acquire) < n_items; ++spins) {
        if (spin_limit > 0 && ((spins & 255) != 0 || now_ns() - spin_start <= spin_limit)) {
            cpu_relax();
            continue;
        }
        pthread_mutex_lock(&pool.sleep_lock);
        atomic_store(&pool.caller_waiting, 1);
        while (atomic_load(&pool.items_done) < n_items) pthread_cond_wait(&pool.done, &pool.sleep_lock);
        atomic_store(&pool.caller_waiting, 0);
        pthread_mutex_unlock(&pool.sleep_lock);
        return;
    }
}

/* Runs fn over jobs[0, n_items) on the calling thread and up to n_threads - 1 helpers. */
static int run_parallel(chunk_fn fn, scan_job *jobs, int64_t n_items, int n_threads) {
    if (n_threads > 1 && n_items > 1 && n_items <= (int64_t)TICKET_MASK &&
        pthread_mutex_trylock(&pool.call_lock) == 0) {
        const int helpers = pool_grow(n_threads - 1);
        pool.fn = fn;
        pool.jobs = jobs;
        atomic_store(&pool.status, 0);
        atomic_store(&pool.items_done, 0);
        atomic_store(&pool.active_helpers, helpers < n_threads - 1 ? helpers : n_threads - 1);
        const uint32_t generation = atomic_load(&pool.generation) + 1;
        atomic_store(&pool.ticket, ticket_make(generation, n_items));
        atomic_store(&pool.generation, generation); /* seq_cst: ordered before reading `sleeping` */
        if (atomic_load(&pool.sleeping) > 0) {
            pthread_mutex_lock(&pool.sleep_lock);
            pthread_cond_broadcast(&pool.wake);
            pthread_mutex_unlock(&pool.sleep_lock);
        }
        run_items(generation);
        wait_for_items(n_items);
        const int status = atomic_load(&pool.status);
        pthread_mutex_unlock(&pool.call_lock);
        return status;
    }
    int status = 0;
    for (int64_t item = 0; item < n_items; ++item) {
        const int item_status = fn(&jobs[item]);
        if (item_status != 0) status = item_status;
    }
    return status;
}

/* Work items over [0, B) with their batch ranges; the caller fills in the rest. */
static scan_job *make_jobs(int64_t B, int64_t *n_items) {
    *n_items = (B + CHUNK_BATCH - 1) / CHUNK_BATCH;
    scan_job *jobs = calloc((size_t)*n_items, sizeof(scan_job));
    if (jobs == NULL) return NULL;
    for (int64_t i = 0; i < *n_items; ++i) {
        jobs[i].b_begin = i * CHUNK_BATCH;
        jobs[i].b_end = (i + 1) * CHUNK_BATCH < B ? (i + 1) * CHUNK_BATCH : B;
    }
    return jobs;
}

/*
 * Forward. x, delta_in, z, out, delta: (B, L, D); delta_bias, Dskip: (D,); AT: (N, D);
 * Bm, Cm: (B, L, N); contiguous except for the row strides of Bm, Cm and z. delta_bias and z may be NULL. delta receives
 * softplus?(delta_in + delta_bias) when a bias or the softplus is asked for (the backward
 * needs it); it may be NULL when no backward follows. n_threads: the calling thread
 * plus helpers.
 */
int dmm_selective_scan_fwd(const float *x, const float *delta_in, const float *delta_bias, int delta_softplus,
                           const float *AT, const float *Bm, const float *Cm, const float *Dskip, const float *z,
                           float *out, float *delta, int64_t B, int64_t L, int64_t D, int64_t N, int64_t stride_B,
                           int64_t stride_C, int64_t stride_z, int n_threads) {
    if (B == 0 || L == 0 || D == 0) return 0;
    int64_t n_items;
    scan_job *jobs = make_jobs(B, &n_items);
    if (jobs == NULL) return DMM_SCAN_ENOMEM;
    for (int64_t i = 0; i < n_items; ++i) {
        jobs[i].x = x; jobs[i].delta_in = delta_in; jobs[i].delta_bias = delta_bias;
        jobs[i].delta_softplus = delta_softplus; jobs[i].AT = AT; jobs[i].Bm = Bm; jobs[i].Cm = Cm;
        jobs[i].Dskip = Dskip; jobs[i].z = z; jobs[i].out = out; jobs[i].delta = delta;
        jobs[i].L = L; jobs[i].D = D; jobs[i].N = N;
        jobs[i].stride_B = stride_B; jobs[i].stride_C = stride_C; jobs[i].stride_z = stride_z;
    }
    const int status = run_parallel(forward_chunk, jobs, n_items, n_threads);
    free(jobs);
    return status;
}

/*
 * Backward. Inputs as in the forward, plus delta (the forward's delta, or delta_in
 * itself when neither bias nor softplus is used) and dout: (B, L, D). Outputs, all
 * overwritten: dx, ddelta_in, dz: (B, L, D); dBm, dCm: (B, L, N); dAT: (N, D); dDskip,
 * ddelta_bias: (D,). dz and ddelta_bias are NULL exactly when z and delta_bias are.
 */
int dmm_selective_scan_bwd(const float *x, const float *delta_in, const float *delta_bias, int delta_softplus,
                           const float *AT, const float *Bm, const float *Cm, const float *Dskip, const float *z,
                           const float *delta, const float *dout, float *dx, float *ddelta_in, float *dAT,
                           float *dBm, float *dCm, float *dDskip, float *dz, float *ddelta_bias, int64_t B,
                           int64_t L, int64_t D, int64_t N, int64_t stride_B, int64_t stride_C, int64_t stride_z,
                           int n_threads) {
    const int64_t ND = N * D;
    const int64_t partial_size = ND + 2 * D; /* dAT, dDskip, ddelta_bias of one item */
    memset(dAT, 0, (size_t)ND * sizeof(float));
    memset(dDskip, 0, (size_t)D * sizeof(float));
    if (ddelta_bias != NULL) memset(ddelta_bias, 0, (size_t)D * sizeof(float));
    if (B == 0 || L == 0 || D == 0) return 0;
    int64_t n_items;
    scan_job *jobs = make_jobs(B, &n_items);
    float *partials = calloc((size_t)n_items * (size_t)partial_size, sizeof(float));
    if (jobs == NULL || partials == NULL) {
        free(jobs);
        free(partials);
        return DMM_SCAN_ENOMEM;
    }
    for (int64_t i = 0; i < n_items; ++i) {
        jobs[i].x = x; jobs[i].delta_in = delta_in; jobs[i].delta_bias = delta_bias;
        jobs[i].delta_softplus = delta_softplus; jobs[i].AT = AT; jobs[i].Bm = Bm; jobs[i].Cm = Cm;
        jobs[i].Dskip = Dskip; jobs[i].z = z; jobs[i].delta = (float *)delta; jobs[i].dout = dout;
        jobs[i].dx = dx; jobs[i].ddelta_in = ddelta_in; jobs[i].dBm = dBm; jobs[i].dCm = dCm; jobs[i].dz = dz;
        jobs[i].L = L; jobs[i].D = D; jobs[i].N = N;
        jobs[i].stride_B = stride_B; jobs[i].stride_C = stride_C; jobs[i].stride_z = stride_z;
        float *partial = partials + i * partial_size;
        jobs[i].dAT = partial;
        jobs[i].dDskip = partial + ND;
        jobs[i].ddelta_bias = ddelta_bias == NULL ? NULL : partial + ND + D;
    }
    const int status = run_parallel(backward_chunk, jobs, n_items, n_threads);
    for (int64_t i = 0; i < n_items; ++i) { /* in item order: see CHUNK_BATCH */
        const float *partial = partials + i * partial_size;
        for (int64_t k = 0; k < ND; ++k) dAT[k] += partial[k];
        for (int64_t d = 0; d < D; ++d) dDskip[d] += partial[ND + d];
        if (ddelta_bias != NULL) {
            for (int64_t d = 0; d < D; ++d) ddelta_bias[d] += partial[ND + D + d];
        }
    }
    free(partials);
    free(jobs);
    return status;
}
