/* RAMDA's step as fused CPU loops: the C kernels of ramda_ds/kernels/native.py.
 *
 * One call handles a range [i0, i1) of work items of a per-step table (see native.py):
 *   ptrs  int64 [T][10]: g, V, U, W0, P, b, W, Z (0: none), Y, Y'   (float32 arrays; P, b, Y, Y'
 *                        of PG are item-packed: see PACKED_INDEX)
 *   geom  int64 [T][4] : R, C, K, goff   (the [R, C, K] view; group c's vectors at goff + c)
 *   scal  double[T][4] : s = lr*sqrt(t), eps, c (averaging weight), mode
 *                        (mode 0: Z = act*b/(P+mu); 1: Z = f*Y (PG); 2: Z = W0 - V/P, unregularized)
 *   items int64 [N][3] : tensor, first group, end group   (every group lies in exactly one item,
 *                        so per-group results do not depend on how items are split over threads)
 * Per-group sums accumulate in double.  Compiled without -ffast-math and with
 * -ffp-contract=off: every float operation is the IEEE one written here, the same in SIMD lanes
 * and scalar tails, so an element's result does not depend on where it sits.  The elementwise
 * arithmetic is the torch path's, op for op (fmaf where ATen's CPU kernels fuse: add with alpha,
 * addcmul, lerp), so it gives the same bits; only the order of the group sums differs.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NPTR 10
#define NGEOM 4
#define NSCAL 4
#define MAXW 4096 /* groups per item (native.py keeps items narrower) */

static const float THIRD = (float)(1.0 / 3.0);
static const float B1 = 709958130.0f;

/* cube root of x >= 0: bit seed, one Halley and one Newton step (ramda_ds/cube_root.py, same ops) */
static inline float cbrt_pi(float x) {
    int32_t bits, yb;
    float y;
    memcpy(&bits, &x, 4);
    float t = (float)bits * THIRD;
    t = t + B1;
    yb = (int32_t)t;
    memcpy(&y, &yb, 4);
    float r = x / (y * y);
    r = r / y;
    float u = (r - 1.0f) / (r + 2.0f);
    y = y + u * y;
    r = x / (y * y);
    r = r / y;
    u = (r - 1.0f) * THIRD;
    y = y + u * y;
    return x > 0.0f ? y : x;
}

#define F(t, k) ((float *)(intptr_t)ptrs[(t) * NPTR + (k)])

/* visit every element of the item's groups [c0, c1): the code sees i (flat index in the tensor)
 * and j (group - c0).  K == 1 (columns of a row-major matrix): rows outermost, groups innermost,
 * so the inner loop runs SIMD over groups, each lane its own group's accumulator (ivdep: no
 * loop-carried dependency).  K > 1: one group at a time, its rows and inner elements. */
#define FOR_ELEMENTS(...)                                                                   \
    if (K == 1) {                                                                           \
        for (int64_t r = 0; r < R; r++) {                                                   \
            const int64_t base = r * C + c0;                                                \
            _Pragma("GCC ivdep")                                                            \
            for (int64_t j = 0; j < nw; j++) {                                              \
                const int64_t i = base + j;                                                 \
                __VA_ARGS__                                                                 \
            }                                                                               \
        }                                                                                   \
    } else {                                                                                \
        for (int64_t j = 0; j < nw; j++)                                                    \
            for (int64_t r = 0; r < R; r++) {                                               \
                const int64_t base = r * C * K + (c0 + j) * K;                              \
                for (int64_t k = 0; k < K; k++) { /* a reduction into a[j]: no ivdep */     \
                    const int64_t i = base + k;                                             \
                    __VA_ARGS__                                                             \
                }                                                                           \
            }                                                                               \
    }

#define ITEM_HEADER                                                                         \
    const int64_t t = items[it * 3], c0 = items[it * 3 + 1], c1 = items[it * 3 + 2];        \
    const int64_t R = geom[t * NGEOM], C = geom[t * NGEOM + 1], K = geom[t * NGEOM + 2];    \
    const int64_t goff = geom[t * NGEOM + 3], nw = c1 - c0;                                 \
    (void)goff; (void)nw;

/* visit every element of the item in its packed copy (contiguous [R][nw] for K == 1, [nw][R*K]
 * otherwise): the code sees ip (packed index) and j (group - c0) */
#define FOR_PACKED(...)                                                                     \
    if (K == 1) {                                                                           \
        for (int64_t r = 0; r < R; r++) {                                                   \
            _Pragma("GCC ivdep")                                                            \
            for (int64_t j = 0; j < nw; j++) {                                              \
                const int64_t ip = r * nw + j;                                              \
                __VA_ARGS__                                                                 \
            }                                                                               \
        }                                                                                   \
    } else {                                                                                \
        for (int64_t j = 0; j < nw; j++)                                                    \
            for (int64_t q = 0; q < R * K; q++) { /* a reduction: no ivdep */               \
                const int64_t ip = j * R * K + q;                                           \
                __VA_ARGS__                                                                 \
            }                                                                               \
    }

/* the packed index of element i of the item (inside FOR_ELEMENTS) */
#define PACKED_INDEX (K == 1 ? r * nw + j : (j * R + r) * K + (i - base))

/* per-thread scratch, grown on demand (the exact solver's packed P, b of an item).  Packed
 * copies matter: a column block of a row-major matrix is strided by the row length, often a
 * power of two, which maps it onto few cache sets. */
static __thread float *scratch;
static __thread int64_t scratch_cap;

static float *scratch_for(int64_t n) {
    if (n > scratch_cap) {
        free(scratch);
        scratch = (float *)malloc((size_t)n * sizeof(float));
        scratch_cap = scratch ? n : 0;
    }
    return scratch;
}

/* the elementwise stage: V += s*g; U += s*g*g; P = cbrt(U) + eps; b = P*W0 - V (torch's ops) */
#define STAGE_ELEMENT                                                                       \
    const float gv = g[i];                                                                  \
    const float v = __builtin_fmaf(s, gv, V[i]); /* torch: V.add_(g, alpha=s) */            \
    const float u = __builtin_fmaf(s * gv, gv, U[i]); /* U.addcmul_(g, g, value=s) */       \
    V[i] = v;                                                                               \
    U[i] = u;                                                                               \
    const float p = cbrt_pi(u) + eps;                                                       \
    const float w0 = W0[i];                                                                 \
    const float bv = p * w0 - v;

/* W <- lerp(W, z, c) as torch's CPU lerp_ (fused multiply-add) */
#define LERP_INTO_W                                                                         \
    if (Z) Z[i] = z;                                                                        \
    const float x = W[i];                                                                   \
    W[i] = small ? __builtin_fmaf(w, z - x, x) : __builtin_fmaf(wm1, z - x, z);

#define LERP_SETUP                                                                          \
    float *Wt = F(t, 6), *Z = F(t, 7);                                                      \
    const float w = (float)scal[t * NSCAL + 2], wm1 = w - 1.0f;                             \
    const int small = w < 0.5f;

#define STAGE_SETUP                                                                         \
    float *g = F(t, 0), *V = F(t, 1), *U = F(t, 2), *W0 = F(t, 3);                          \
    const float s = (float)scal[t * NSCAL], eps = (float)scal[t * NSCAL + 1];

/* unregularized tensors in one pass: the stage, then Z = W0 - V/P and W <- lerp(W, Z, c) */
void ramda_free(const int64_t *ptrs, const int64_t *geom, const double *scal, const int64_t *items,
                int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; it++) {
        ITEM_HEADER
        STAGE_SETUP
        LERP_SETUP
        float *W = Wt;
        FOR_ELEMENTS({
            STAGE_ELEMENT
            (void)bv;
            const float z = w0 - v / p; /* torch.addcdiv(W0, V, P, value=-1) */
            LERP_INTO_W
        })
    }
}

/* the exact solver's stage on one element: P, b into the item's packed copy, per group
 * sum b^2 into ACC[j], max P into mx[j], min P into mn[j] */
#define EXACT_STAGE_ELEMENT(ACC)                                                            \
    STAGE_ELEMENT                                                                           \
    const int64_t ip = PACKED_INDEX;                                                        \
    P[ip] = p;                                                                              \
    b[ip] = bv;                                                                             \
    ACC[j] += (double)(bv * bv);                                                            \
    mx[j] = p > mx[j] ? p : mx[j];                                                          \
    mn[j] = p < mn[j] ? p : mn[j];

/* one Newton pass over the item's packed P, b at m[j] = (float)mu_g: per group
 * sum b^2/(P+mu)^2 into a2[j] and sum b^2/(P+mu)^3 into a3[j] */
#define NEWTON_SUMS                                                                         \
    FOR_PACKED({                                                                            \
        const float bv = b[ip];                                                             \
        const float d = 1.0f / (P[ip] + m[j]);                                              \
        const float q = ((bv * bv) * d) * d;                                                \
        a2[j] += (double)q;                                                                 \
        a3[j] += (double)(q * d);                                                           \
    })

/* the exact solver's result on one element, Z = act*b/(P+mu), and W <- lerp(W, Z, c) */
#define EXACT_RESULT_ELEMENT                                                                \
    const int64_t ip = PACKED_INDEX;                                                        \
    const float z = (b[ip] / (P[ip] + m[j])) * ga[j];                                       \
    LERP_INTO_W

/* RAMDA + exact solver, one pass per item: the stage into the item's P, b (then in cache), per
 * group screening ||b_g|| > tau and the bracket [tau*min P, tau*max P]/(||b_g|| - tau), safeguarded
 * Newton on 1/||Z(mu)|| - mu/tau until every group of the item satisfies |mu*||Z|| - tau| <= tol*tau
 * (as ramda_ds.solvers.solve_exact, per item instead of per tensor), Z = b/(P + mu) on surviving
 * groups, W <- lerp(W, Z, c).  pos_in (or NULL: cold, start at the bracket's upper end) and pos_out:
 * each group's root position (mu - lo)/(hi - lo); act_out: the screening mask; passes_out: Newton
 * passes per item.  Returns 1 if the scratch could not be allocated (items from the failing one on
 * are untouched), else 0. */
int ramda_exact(const int64_t *ptrs, const int64_t *geom, const double *scal, const int64_t *items,
                int64_t i0, int64_t i1, const double *tau_t, const double *pos_in, double *pos_out,
                float *act_out, int32_t *passes_out, int max_iters, double tol) {
    double a2[MAXW], a3[MAXW], mu[MAXW], lo[MAXW], hi[MAXW], lo0[MAXW], hi0[MAXW];
    float mx[MAXW], mn[MAXW], m[MAXW], ga[MAXW];
    for (int64_t it = i0; it < i1; it++) {
        ITEM_HEADER
        STAGE_SETUP
        LERP_SETUP
        float *W = Wt;
        const double tau = tau_t[t];
        const int64_t n = R * K * nw;
        float *P = scratch_for(2 * n); /* the item's P, b, packed: they stay in cache */
        if (!P) return 1;              /* nothing of this item changed: the caller raises */
        float *b = P + n;
        for (int64_t j = 0; j < nw; j++) { a2[j] = 0.0; mx[j] = -__builtin_inff(); mn[j] = __builtin_inff(); }
        FOR_ELEMENTS({ EXACT_STAGE_ELEMENT(a2) })
        for (int64_t j = 0; j < nw; j++) {
            const double nb = __builtin_sqrt(a2[j]);
            const int act = nb > tau;
            double excess = nb - tau;
            excess = excess > 1e-300 ? excess : 1e-300;
            lo[j] = lo0[j] = act ? tau * (double)mn[j] / excess : 0.0;
            hi[j] = hi0[j] = act ? tau * (double)mx[j] / excess : 0.0;
            mu[j] = hi[j];
            if (pos_in) {
                double q = pos_in[goff + c0 + j];
                q = q < 0.0 ? 0.0 : (q > 1.0 ? 1.0 : q);
                mu[j] = q < 0.5 ? lo[j] + q * (hi[j] - lo[j]) : hi[j] - (hi[j] - lo[j]) * (1.0 - q);
            }
            ga[j] = act ? 1.0f : 0.0f;
            act_out[goff + c0 + j] = ga[j];
        }
        int passes = 0;
        for (int iter = 1; tau > 0.0 && iter <= max_iters; iter++) {
            for (int64_t j = 0; j < nw; j++) { a2[j] = 0.0; a3[j] = 0.0; m[j] = (float)mu[j]; }
            NEWTON_SUMS
            int bad = 0;
            for (int64_t j = 0; j < nw; j++) {
                double zn2 = a2[j] > 1e-300 ? a2[j] : 1e-300;
                const double zn = __builtin_sqrt(zn2);
                const double phi = 1.0 / zn - mu[j] / tau;
                const double dphi = a3[j] / (zn * zn * zn) - 1.0 / tau;
                if (phi > 0) lo[j] = mu[j]; else hi[j] = mu[j];
                const double step = mu[j] - phi / dphi;
                const int inside = step >= lo[j] && step <= hi[j];
                if (ga[j] != 0.0f) {
                    bad += __builtin_fabs(mu[j] * zn - tau) > tol * tau;
                    mu[j] = inside ? step : 0.5 * (lo[j] + hi[j]);
                }
            }
            passes = iter;
            if (!bad) break;
        }
        for (int64_t j = 0; j < nw; j++) {
            m[j] = (float)mu[j];
            double q = (mu[j] - lo0[j]) / (hi0[j] - lo0[j]);
            pos_out[goff + c0 + j] = q == q && q != __builtin_inf() && q != -__builtin_inf() ? q : 1.0;
        }
        FOR_ELEMENTS({ EXACT_RESULT_ELEMENT })
        passes_out[it] = passes;
    }
    return 0;
}

/* PG's stage, shared by RAMDA and ProxGen: store P, b item-packed and accumulate per group
 * sum b^2, max P and Q's constant sum ((P*0.5)*X - S)*X (RAMDA: X = W0, S = V; ProxGen: X = W,
 * S = a*m) */
#define PG_SUMS_INIT                                                                        \
    for (int64_t j = 0; j < nw; j++) { acc[j] = 0.0; cacc[j] = 0.0; mx[j] = -__builtin_inff(); }

#define PG_SUMS_ELEMENT(PV, BV, X, S)                                                       \
    {                                                                                       \
        const int64_t ip = PACKED_INDEX;                                                    \
        P[ip] = (PV);                                                                       \
        b[ip] = (BV);                                                                       \
        acc[j] += (double)((BV) * (BV));                                                    \
        mx[j] = (PV) > mx[j] ? (PV) : mx[j];                                                \
        const float q = ((PV) * 0.5f) * (X) - (S);                                          \
        cacc[j] += (double)(q * (X));                                                       \
    }

#define PG_SUMS_STORE                                                                       \
    for (int64_t j = 0; j < nw; j++) {                                                      \
        bb[goff + c0 + j] = acc[j];                                                         \
        pmax[goff + c0 + j] = mx[j];                                                        \
        cst[goff + c0 + j] = cacc[j];                                                       \
    }

/* PG's stage: the elementwise stage into P, b (item-packed) and per group sum b^2, max P and
 * sum ((P*0.5)*W0 - V)*W0 (Q's constant) */
void ramda_pg_stage(const int64_t *ptrs, const int64_t *geom, const double *scal,
                    const int64_t *items, int64_t i0, int64_t i1, double *bb, double *cst,
                    float *pmax) {
    double acc[MAXW], cacc[MAXW];
    float mx[MAXW];
    for (int64_t it = i0; it < i1; it++) {
        ITEM_HEADER
        STAGE_SETUP
        float *P = F(t, 4) + R * K * c0, *b = F(t, 5) + R * K * c0; /* item-packed */
        PG_SUMS_INIT
        FOR_ELEMENTS({
            STAGE_ELEMENT
            PG_SUMS_ELEMENT(p, bv, w0, v)
        })
        PG_SUMS_STORE
    }
}

#define PG_ELEMENT(SRC)                                                                     \
    const float pv = Pp[ip], bv = bp[ip];                                                   \
    const float z = (SRC) * fg[j];                                                          \
    const float A = 1.0f - pv * eg[j];                                                      \
    const float y = __builtin_fmaf(A, z, bv * eg[j]); /* torch.addcmul(B, A, z) */          \
    Yp[ip] = y;                                                                             \
    const double yd = (double)y;                                                            \
    a1[j] += yd * yd;                                                                       \
    a2[j] += ((double)pv * yd) * yd;                                                        \
    a3[j] += (double)bv * yd;

/* PG (Alg. 2), n_iter[t] iterations of each tensor's items, each item in cache for all of them
 * (P, b, Y, Y' are stored item-packed: every item's block is contiguous).  Iteration: Z = f*Y
 * (f: each group's soft-threshold factor from the previous iteration; the chunk starts from Y in
 * column src, or from W in column 6), Y = eta*b + (1 - eta*P)*Z, per group
 * s1 = sum Y^2, s2 = sum P*Y^2, s3 = sum b*Y, then f = max(0, 1 - eta*tau/||Y||) and the item's
 * share of Q(f*Y) = sum_g 0.5 f^2 s2 - f s3 + tau f ||Y|| into q_out[item * n_max + iteration].
 * f is read at the start and written at the end; every iterate goes to column dst. */
void ramda_pg_chunk(const int64_t *ptrs, const int64_t *geom, const int64_t *items, int64_t i0,
                    int64_t i1, const int32_t *n_iter, int n_max, const double *tau_t,
                    const double *eta, double *f, int src, int dst, double *q_out) {
    double a1[MAXW], a2[MAXW], a3[MAXW], fd[MAXW];
    float fg[MAXW], eg[MAXW];
    for (int64_t it = i0; it < i1; it++) {
        ITEM_HEADER
        if (n_iter[t] <= 0) continue;
        const int64_t off = R * K * c0; /* P, b, Y, Y' are item-packed; W is not */
        const float *Pp = F(t, 4) + off, *bp = F(t, 5) + off;
        float *Yp = F(t, dst) + off;
        const double tau = tau_t[t];
        for (int64_t j = 0; j < nw; j++) {
            fd[j] = f[goff + c0 + j];
            eg[j] = (float)eta[goff + c0 + j];
        }
        for (int m = 0; m < n_iter[t]; m++) {
            for (int64_t j = 0; j < nw; j++) { a1[j] = 0.0; a2[j] = 0.0; a3[j] = 0.0; fg[j] = (float)fd[j]; }
            if (m == 0 && src == 6) { /* the first iteration: Z = act*W */
                const float *Wsrc = F(t, 6);
                FOR_ELEMENTS({
                    const int64_t ip = PACKED_INDEX;
                    PG_ELEMENT(Wsrc[i])
                })
            } else if (m == 0) {
                const float *Ys = F(t, src) + off;
                FOR_PACKED({ PG_ELEMENT(Ys[ip]) })
            } else {
                FOR_PACKED({ PG_ELEMENT(Yp[ip]) })
            }
            double q = 0.0;
            for (int64_t j = 0; j < nw; j++) {
                const double nrm = __builtin_sqrt(a1[j]);
                double fj = 1.0 - eta[goff + c0 + j] * tau / (nrm > 1e-300 ? nrm : 1e-300);
                fj = fj > 0.0 ? fj : 0.0;
                fd[j] = fj;
                q += 0.5 * fj * fj * a2[j] - fj * a3[j] + tau * fj * nrm;
            }
            q_out[it * n_max + m] = q;
        }
        for (int64_t j = 0; j < nw; j++) f[goff + c0 + j] = fd[j];
    }
}

/* One PG iteration for sharded tensors, whose groups' sums are completed across ranks before
 * f can be computed: over the items of tensors with live[t] != 0, Z = f*Y (Y from column src,
 * or W for src 6), Y = eta*b + (1 - eta*P)*Z into column dst, and per group the partial sums
 * s1 = sum Y^2, s2 = sum P*Y^2, s3 = sum b*Y at goff + c0 + j (the same ops as ramda_pg_chunk). */
void ramda_pg_iter(const int64_t *ptrs, const int64_t *geom, const int64_t *items, int64_t i0,
                   int64_t i1, const int32_t *live, const double *eta, const double *f, int src,
                   int dst, double *s1, double *s2, double *s3) {
    double a1[MAXW], a2[MAXW], a3[MAXW];
    float fg[MAXW], eg[MAXW];
    for (int64_t it = i0; it < i1; it++) {
        ITEM_HEADER
        if (!live[t]) continue;
        const int64_t off = R * K * c0; /* P, b, Y, Y' are item-packed; W is not */
        const float *Pp = F(t, 4) + off, *bp = F(t, 5) + off;
        float *Yp = F(t, dst) + off;
        for (int64_t j = 0; j < nw; j++) {
            a1[j] = 0.0; a2[j] = 0.0; a3[j] = 0.0;
            fg[j] = (float)f[goff + c0 + j];
            eg[j] = (float)eta[goff + c0 + j];
        }
        if (src == 6) {
            const float *Wsrc = F(t, 6);
            FOR_ELEMENTS({
                const int64_t ip = PACKED_INDEX;
                PG_ELEMENT(Wsrc[i])
            })
        } else {
            const float *Ys = F(t, src) + off;
            FOR_PACKED({ PG_ELEMENT(Ys[ip]) })
        }
        for (int64_t j = 0; j < nw; j++) {
            s1[goff + c0 + j] = a1[j];
            s2[goff + c0 + j] = a2[j];
            s3[goff + c0 + j] = a3[j];
        }
    }
}

/* The exact solver for sharded tensors, whose Newton iterations need group sums completed
 * across ranks (ramda_ds/kernels/sharded.py runs the Newton update between the passes):
 * the stage into P, b (item-packed) with per group sum b^2, max P and min P ... */
void ramda_exact_stage(const int64_t *ptrs, const int64_t *geom, const double *scal,
                       const int64_t *items, int64_t i0, int64_t i1, double *bb, float *pmax,
                       float *pmin) {
    double acc[MAXW];
    float mx[MAXW], mn[MAXW];
    for (int64_t it = i0; it < i1; it++) {
        ITEM_HEADER
        STAGE_SETUP
        float *P = F(t, 4) + R * K * c0, *b = F(t, 5) + R * K * c0; /* item-packed */
        for (int64_t j = 0; j < nw; j++) { acc[j] = 0.0; mx[j] = -__builtin_inff(); mn[j] = __builtin_inff(); }
        FOR_ELEMENTS({ EXACT_STAGE_ELEMENT(acc) })
        for (int64_t j = 0; j < nw; j++) {
            bb[goff + c0 + j] = acc[j];
            pmax[goff + c0 + j] = mx[j];
            pmin[goff + c0 + j] = mn[j];
        }
    }
}

/* ... one Newton pass of the rows with live[t]: per group sum b^2/(P+mu)^2 and sum b^2/(P+mu)^3
 * (the ops of ramda_exact) ... */
void ramda_exact_iter(const int64_t *ptrs, const int64_t *geom, const int64_t *items, int64_t i0,
                      int64_t i1, const int32_t *live, const double *mu, double *s2, double *s3) {
    double a2[MAXW], a3[MAXW];
    float m[MAXW];
    for (int64_t it = i0; it < i1; it++) {
        ITEM_HEADER
        if (!live[t]) continue;
        const int64_t off = R * K * c0;
        const float *P = F(t, 4) + off, *b = F(t, 5) + off;
        for (int64_t j = 0; j < nw; j++) { a2[j] = 0.0; a3[j] = 0.0; m[j] = (float)mu[goff + c0 + j]; }
        NEWTON_SUMS
        for (int64_t j = 0; j < nw; j++) {
            s2[goff + c0 + j] = a2[j];
            s3[goff + c0 + j] = a3[j];
        }
    }
}

/* ... and the result Z = act*b/(P+mu), W <- lerp(W, Z, c). */
void ramda_exact_finish(const int64_t *ptrs, const int64_t *geom, const double *scal,
                        const int64_t *items, int64_t i0, int64_t i1, const double *mu,
                        const float *act) {
    float m[MAXW], ga[MAXW];
    for (int64_t it = i0; it < i1; it++) {
        ITEM_HEADER
        LERP_SETUP
        float *W = Wt;
        const int64_t off = R * K * c0;
        const float *P = F(t, 4) + off, *b = F(t, 5) + off;
        for (int64_t j = 0; j < nw; j++) { m[j] = (float)mu[goff + c0 + j]; ga[j] = act[goff + c0 + j]; }
        FOR_ELEMENTS({ EXACT_RESULT_ELEMENT })
    }
}

/* PG's result: Z = f*Y (Y from column ycol[t]) and W <- lerp(W, Z, c) */
void ramda_pg_finish(const int64_t *ptrs, const int64_t *geom, const double *scal,
                     const int64_t *items, int64_t i0, int64_t i1, const double *f,
                     const int64_t *ycol) {
    float fg[MAXW];
    for (int64_t it = i0; it < i1; it++) {
        ITEM_HEADER
        LERP_SETUP
        const float *Y = F(t, ycol[t]) + R * K * c0; /* item-packed */
        float *W = Wt;
        for (int64_t j = 0; j < nw; j++) fg[j] = (float)f[goff + c0 + j];
        FOR_ELEMENTS({
            const float z = Y[PACKED_INDEX] * fg[j];
            LERP_INTO_W
        })
    }
}

/* ProxGen (AdamW's preconditioner, ramda_ds/optim/proxgen.py), the torch path's ops.  pscal[t][8]:
 * a = lr/(1 - b1^t), eps, 1 - b1, b2, 1 - b2, sqrt(1 - b2^t), 1 - lr*wd, mode (1 PG, 2 free):
 *   W *= 1 - lr*wd;  m = lerp(m, g, 1 - b1);  v = v*b2 + (1 - b2)*g*g;  D = sqrt(v)/c2 + eps
 *   unregularized (proxgen_free):  W = W - (a*m)/D
 *   regularized (proxgen_pg_stage): P = D, b = D*W - a*m (item-packed), per group sum b^2,
 *   max P and sum ((0.5*D)*W - a*m)*W; PG then runs from W (ramda_pg_chunk, ramda_pg_finish
 *   with c = 1). */
#define PROXGEN_ELEMENT                                                                     \
    const float gv = g[i];                                                                  \
    const float x = decay != 1.0f ? W[i] * decay : W[i];                                    \
    const float mv = __builtin_fmaf(w1, gv - M[i], M[i]); /* m.lerp_(g, 1 - b1) */          \
    const float vv = __builtin_fmaf(w2 * gv, gv, Vs[i] * b2); /* v.mul_(b2).addcmul_ */     \
    M[i] = mv;                                                                              \
    Vs[i] = vv;                                                                             \
    const float D = __builtin_sqrtf(vv) / c2 + eps;                                         \
    const float am = mv * a;

#define PROXGEN_SETUP                                                                       \
    const float *g = F(t, 0);                                                               \
    float *M = F(t, 1), *Vs = F(t, 2), *W = F(t, 6);                                        \
    const double *q8 = pscal + t * 8;                                                       \
    const float a = (float)q8[0], eps = (float)q8[1], w1 = (float)q8[2], b2 = (float)q8[3]; \
    const float w2 = (float)q8[4], c2 = (float)q8[5], decay = (float)q8[6];

void proxgen_free(const int64_t *ptrs, const int64_t *geom, const double *pscal,
                  const int64_t *items, int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; it++) {
        ITEM_HEADER
        PROXGEN_SETUP
        FOR_ELEMENTS({
            PROXGEN_ELEMENT
            W[i] = x - am / D; /* torch.addcdiv(W, a*m, D, value=-1) */
        })
    }
}

void proxgen_pg_stage(const int64_t *ptrs, const int64_t *geom, const double *pscal,
                      const int64_t *items, int64_t i0, int64_t i1, double *bb, double *cst,
                      float *pmax) {
    double acc[MAXW], cacc[MAXW];
    float mx[MAXW];
    for (int64_t it = i0; it < i1; it++) {
        ITEM_HEADER
        PROXGEN_SETUP
        float *P = F(t, 4) + R * K * c0, *b = F(t, 5) + R * K * c0; /* item-packed */
        PG_SUMS_INIT
        FOR_ELEMENTS({
            PROXGEN_ELEMENT
            W[i] = x; /* the decayed W: PG's warm start */
            const float bv = D * x - am;
            PG_SUMS_ELEMENT(D, bv, x, am)
        })
        PG_SUMS_STORE
    }
}

/* the cube root alone, for the tests (bitwise against ramda_ds.cube_root) */
void ramda_cbrt(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = cbrt_pi(x[i]);
}
