/*
 * MSDA on the CPU in one pass per direction: every query reads its own k*k window of keys and values straight
 * from q, k and v, so nothing of window size is ever written to memory except the backward's per-slot
 * probabilities and logit gradients (k*k scalars per query and head).
 *
 * Built once per machine by dilateformer/ops/native.py (plain C, no PyTorch headers), included twice: with
 * SCALAR = float, SUFFIX = _f32 and with SCALAR = double, SUFFIX = _f64 (tgmath.h picks expf/exp to match).
 * The float32 pass also defines WITH_BLOCKS: where the compiler targets AVX2 + FMA and head_dim is a multiple of 8,
 * the query-side kernels then run on blocks of 8 neighbouring queries (msda_blocks.h); everything else runs the
 * per-query kernels below.
 * Work is split into ranges of image rows (or of (batch, head) pairs). Built with -fopenmp, the *_parallel entry
 * points split a whole range over an OpenMP team: the library then shares PyTorch's libgomp and so its warm thread
 * team, instead of competing with it (idle OpenMP workers spin for a while after every parallel ATen op). Without
 * OpenMP, Python threads run the ranges: ctypes releases the GIL for the duration of each call.
 *
 * Layout: q, k, v are (B, H, W, heads, head_dim) with heads and head_dim dense and a uniform stride between
 * pixels (q_stride etc.), which covers both contiguous tensors and the q/k/v views of a fused qkv projection.
 * out, grads are contiguous; lse is (B, H, W, heads). The backward's probs and dlogits are
 * (B * H, heads, k*k, W): for one image row, head and window slot, a contiguous run over x.
 *
 * Windows come as per-axis tables built by neighborhood.py: rows[g][y][a] is the key row of query row y at slot a
 * in head group g, with row_valid saying whether that slot exists. Border "zero": an invalid slot is a zero key
 * (logit 0, part of the softmax, no value); border "clamp": it is left out of the softmax.
 */
#include <tgmath.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef SPLIT_RANGE
/* Runs CALL (which uses `begin` and `end`) on an even share of [0, total) in each of `threads` OpenMP threads; the
 * enclosing function names its thread count `threads`. */
#ifdef _OPENMP
#define SPLIT_RANGE(total, CALL)                                                                                    \
    _Pragma("omp parallel num_threads(threads)") {                                                                  \
        const int64_t team_ = omp_get_num_threads(), member_ = omp_get_thread_num();                                \
        const int64_t begin = (total) * member_ / team_, end = (total) * (member_ + 1) / team_;                     \
        if (begin < end) CALL;                                                                                      \
    }
#else
#define SPLIT_RANGE(total, CALL)                                                                                    \
    do {                                                                                                            \
        const int64_t begin = 0, end = (total);                                                                     \
        (void)threads;                                                                                              \
        if (begin < end) CALL;                                                                                      \
    } while (0)
#endif
#endif

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUFFIX)

typedef struct {
    int64_t batch, height, width, heads, head_dim, kernel_size, groups;
    int64_t q_stride, k_stride, v_stride;
    const int64_t *rows, *cols, *dilations;
    const uint8_t *row_valid, *col_valid;
    double scale;
    int64_t zero_border;
    int64_t prob_rows; /* image rows that probs and dlogits hold: row r lives at r % prob_rows */
} FN(msda_problem);

#define problem_t FN(msda_problem)

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* head_dim is passed as a compile-time constant where the dispatchers below know it, so these loops unroll and the
 * accumulators stay in vector registers across the k*k window slots. */
ALWAYS_INLINE SCALAR FN(dot)(const SCALAR *restrict a, const SCALAR *restrict b, const int64_t n) {
    SCALAR acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

ALWAYS_INLINE void FN(axpy)(SCALAR *restrict y, const SCALAR w, const SCALAR *restrict x, const int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] += w * x[i];
}

/* The pixel offsets (in units of pixels) of the k*k window of query (b, y, x) in head group g; valid[s] says
 * whether slot s is a real key. Shared by every head of the group. */
ALWAYS_INLINE void FN(window)(const problem_t *p, int64_t b, int64_t y, int64_t x, int64_t g, int64_t *pixel,
                              uint8_t *valid) {
    const int64_t ks = p->kernel_size;
    const int64_t *rows = p->rows + (g * p->height + y) * ks, *cols = p->cols + (g * p->width + x) * ks;
    const uint8_t *rv = p->row_valid + (g * p->height + y) * ks, *cv = p->col_valid + (g * p->width + x) * ks;
    for (int64_t a = 0; a < ks; a++) {
        for (int64_t c = 0; c < ks; c++) {
            pixel[a * ks + c] = (b * p->height + rows[a]) * p->width + cols[c];
            valid[a * ks + c] = rv[a] && cv[c];
        }
    }
}

ALWAYS_INLINE int64_t FN(max_dilation)(const problem_t *p) {
    int64_t largest = 1;
    for (int64_t g = 0; g < p->groups; g++) largest = p->dilations[g] > largest ? p->dilations[g] : largest;
    return largest;
}

/* Asks for `count` pixels (stride elements apart) from pixel `start` of `base` to be brought into L2, skipping
 * ranges outside [0, limit) pixels. The kernels walk image rows in order and ask for the rows they will first read
 * one row later, so those arrive from memory while the current row computes. */
ALWAYS_INLINE void FN(prefetch_pixels)(const SCALAR *base, int64_t stride, int64_t start, int64_t count,
                                       int64_t limit) {
    if (start < 0 || start + count > limit) return;
    const char *first = (const char *)(base + start * stride), *last = (const char *)(base + (start + count) * stride);
    for (const char *line = first; line < last; line += 64) __builtin_prefetch(line, 0, 2);
}

/* Offset of query row r = b * H + y in probs / dlogits, which hold (heads, k*k, W) per row. */
ALWAYS_INLINE int64_t FN(prob_row)(const problem_t *p, int64_t r) {
    return (r % p->prob_rows) * p->heads * p->kernel_size * p->kernel_size * p->width;
}

/* Index of (head h, slot s, column x) within a row of probs / dlogits. */
ALWAYS_INLINE int64_t FN(slot_index)(const problem_t *p, int64_t h, int64_t s, int64_t x) {
    return (h * p->kernel_size * p->kernel_size + s) * p->width + x;
}

/* Scaled logits of one (query, head) over its window; returns their maximum. */
ALWAYS_INLINE SCALAR FN(logits)(const problem_t *p, const SCALAR *qp, const SCALAR *k, int64_t h, const int64_t *pixel,
                                const uint8_t *valid, int64_t window, SCALAR *logit, const int64_t hd) {
    SCALAR top = -INFINITY;
    for (int64_t s = 0; s < window; s++) {
        logit[s] = valid[s] ? FN(dot)(qp, k + pixel[s] * p->k_stride + h * hd, hd) * (SCALAR)p->scale
                            : (p->zero_border ? (SCALAR)0 : -INFINITY);
        top = fmax(top, logit[s]);
    }
    return top;
}

ALWAYS_INLINE void FN(forward_rows)(const problem_t *p, const SCALAR *q, const SCALAR *k, const SCALAR *v, SCALAR *out,
                                    SCALAR *lse, int64_t row_begin, int64_t row_end, const int64_t hd) {
    const int64_t window = p->kernel_size * p->kernel_size, per_group = p->heads / p->groups;
    int64_t pixel[window];
    uint8_t valid[window];
    SCALAR logit[window];
    for (int64_t r = row_begin; r < row_end; r++) {
        const int64_t b = r / p->height, y = r % p->height;
        for (int64_t x = 0; x < p->width; x++) {
            const int64_t here = r * p->width + x;
            for (int64_t g = 0; g < p->groups; g++) {
                FN(window)(p, b, y, x, g, pixel, valid);
                for (int64_t h = g * per_group; h < (g + 1) * per_group; h++) {
                    const SCALAR top = FN(logits)(p, q + here * p->q_stride + h * hd, k, h, pixel, valid, window,
                                                  logit, hd);
                    SCALAR total = 0, acc[hd];
#pragma omp simd reduction(+ : total)
                    for (int64_t s = 0; s < window; s++) {
                        logit[s] = exp(logit[s] - top);
                        total += logit[s];
                    }
                    for (int64_t i = 0; i < hd; i++) acc[i] = 0;
                    for (int64_t s = 0; s < window; s++) {
                        if (valid[s]) FN(axpy)(acc, logit[s], v + pixel[s] * p->v_stride + h * hd, hd);
                    }
                    SCALAR *op = out + (here * p->heads + h) * hd;
                    const SCALAR inverse = 1 / total;
                    for (int64_t i = 0; i < hd; i++) op[i] = acc[i] * inverse;
                    lse[here * p->heads + h] = top + log(total);
                }
            }
        }
    }
}

/* Backward, first pass, per query: dq, and per slot the probability and the logit gradient (zero for slots that
 * are not real keys). */
ALWAYS_INLINE void FN(backward_query_rows)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q, const SCALAR *k,
                                           const SCALAR *v, const SCALAR *out, const SCALAR *lse, SCALAR *grad_q,
                                           SCALAR *probs, SCALAR *dlogits, int64_t row_begin, int64_t row_end,
                                           const int64_t hd) {
    const int64_t window = p->kernel_size * p->kernel_size, per_group = p->heads / p->groups;
    int64_t pixel[window];
    uint8_t valid[window];
    SCALAR logit[window];
    for (int64_t r = row_begin; r < row_end; r++) {
        const int64_t b = r / p->height, y = r % p->height;
        SCALAR *row_probs = probs + FN(prob_row)(p, r), *row_dlogits = dlogits + FN(prob_row)(p, r);
        for (int64_t x = 0; x < p->width; x++) {
            const int64_t here = r * p->width + x;
            for (int64_t g = 0; g < p->groups; g++) {
                FN(window)(p, b, y, x, g, pixel, valid);
                for (int64_t h = g * per_group; h < (g + 1) * per_group; h++) {
                    const int64_t item = here * p->heads + h;
                    const SCALAR *dout = grad_out + item * hd;
                    const SCALAR delta = FN(dot)(dout, out + item * hd, hd);
                    FN(logits)(p, q + here * p->q_stride + h * hd, k, h, pixel, valid, window, logit, hd);
                    SCALAR dq[hd];
                    for (int64_t i = 0; i < hd; i++) dq[i] = 0;
                    for (int64_t s = 0; s < window; s++) {
                        SCALAR prob = 0, dlogit = 0;
                        if (valid[s]) {
                            prob = exp(logit[s] - lse[item]);
                            dlogit = prob * (FN(dot)(dout, v + pixel[s] * p->v_stride + h * hd, hd) - delta) *
                                     (SCALAR)p->scale;
                            if (grad_q) FN(axpy)(dq, dlogit, k + pixel[s] * p->k_stride + h * hd, hd);
                        }
                        row_probs[FN(slot_index)(p, h, s, x)] = prob;
                        row_dlogits[FN(slot_index)(p, h, s, x)] = dlogit;
                    }
                    if (grad_q)
                        for (int64_t i = 0; i < hd; i++) grad_q[item * hd + i] = dq[i];
                }
            }
        }
    }
}

/* Backward, second pass for border "zero": the window is a pure shift, so key (y, x) sits in slot (a, c) of exactly
 * one query, (y - (a - radius) * d, x - (c - radius) * d), when that query is inside the image. Each key gathers
 * its dk and dv from those queries: no two tasks write the same key. */

/* Per slot row a of key row r = (b, y) in head group g: the query row whose slot row a is this key row, or -1
 * outside the image, and that row's offset in probs / dlogits. */
ALWAYS_INLINE void FN(key_row_queries)(const problem_t *p, int64_t r, int64_t g, int64_t *query_row,
                                       int64_t *query_probs) {
    const int64_t ks = p->kernel_size, radius = (ks - 1) / 2, b = r / p->height, y = r % p->height;
    for (int64_t a = 0; a < ks; a++) {
        const int64_t qy = y - (a - radius) * p->dilations[g];
        const int inside = qy >= 0 && qy < p->height;
        query_row[a] = inside ? b * p->height + qy : -1;
        query_probs[a] = inside ? FN(prob_row)(p, b * p->height + qy) : 0;
    }
}

/* dk and dv of key (r, x), head h, from the query rows of key_row_queries; checks every slot's column. */
ALWAYS_INLINE void FN(zero_key)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q, const SCALAR *probs,
                                const SCALAR *dlogits, SCALAR *grad_k, SCALAR *grad_v, const int64_t *query_row,
                                const int64_t *query_probs, int64_t r, int64_t x, int64_t h, const int64_t hd) {
    const int64_t ks = p->kernel_size, radius = (ks - 1) / 2, width = p->width, row_pixels = p->heads * hd;
    const int64_t dilation = p->dilations[h / (p->heads / p->groups)];
    SCALAR dk[hd], dv[hd];
    for (int64_t i = 0; i < hd; i++) dk[i] = dv[i] = 0;
    for (int64_t a = 0; a < ks; a++) {
        const int64_t qr = query_row[a];
        if (qr < 0) continue;
        for (int64_t c = 0; c < ks; c++) {
            const int64_t qx = x - (c - radius) * dilation;
            if (qx < 0 || qx >= width) continue;
            const int64_t query = qr * width + qx;
            const int64_t at = query_probs[a] + FN(slot_index)(p, h, a * ks + c, qx);
            FN(axpy)(dk, dlogits[at], q + query * p->q_stride + h * hd, hd);
            FN(axpy)(dv, probs[at], grad_out + query * row_pixels + h * hd, hd);
        }
    }
    SCALAR *gk = grad_k + (r * width + x) * row_pixels + h * hd;
    SCALAR *gv = grad_v + (r * width + x) * row_pixels + h * hd;
    for (int64_t i = 0; i < hd; i++) gk[i] = dk[i], gv[i] = dv[i];
}

ALWAYS_INLINE void FN(backward_zero_key_rows)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q,
                                              const SCALAR *probs, const SCALAR *dlogits, SCALAR *grad_k,
                                              SCALAR *grad_v, int64_t row_begin, int64_t row_end, const int64_t hd) {
    const int64_t ks = p->kernel_size, width = p->width, per_group = p->heads / p->groups, row_pixels = p->heads * hd;
    const int64_t ahead = (ks - 1) / 2 * FN(max_dilation)(p), limit = p->batch * p->height * width;
    int64_t query_row[p->groups * ks], query_probs[p->groups * ks];
    for (int64_t r = row_begin; r < row_end; r++) {
        for (int64_t g = 0; g < p->groups; g++) FN(key_row_queries)(p, r, g, query_row + g * ks, query_probs + g * ks);
        for (int64_t x = 0; x < width; x++) {
            if (x % 8 == 0) {
                const int64_t next = (r + 1 + ahead) * width + x, count = width - x < 8 ? width - x : 8;
                FN(prefetch_pixels)(q, p->q_stride, next, count, limit);
                FN(prefetch_pixels)(grad_out, row_pixels, next, count, limit);
            }
            for (int64_t h = 0; h < p->heads; h++) {
                const int64_t g = h / per_group;
                FN(zero_key)(p, grad_out, q, probs, dlogits, grad_k, grad_v, query_row + g * ks, query_probs + g * ks,
                             r, x, h, hd);
            }
        }
    }
}

#if defined(WITH_BLOCKS) && defined(__AVX2__) && defined(__FMA__)
#define HAVE_BLOCKS 1
#include "msda_blocks.h"
#else
#define HAVE_BLOCKS 0
#endif

#if HAVE_BLOCKS
/* The key pass on runs of KEY_RUN keys d columns apart (d the head's dilation), for border "zero", head_dim a
 * multiple of 8 and keys whose every slot's query is inside the image. Key x_j = x + j * d sits in slot c of query
 * x_j - (c - radius) * d, so the run's keys share their queries: each query's vector is loaded once per slot row
 * and feeds every key of the run it reaches (KEY_RUN + 2 * radius loads for KEY_RUN * k weighted terms, against one
 * load per term key by key). The run's sums stay in registers across the k*k slots. */
#define KEY_RUN 4
#define KEY_RUN_MAX_LANES 8 /* head_dim <= 64: the sums are fixed-size arrays, which GCC keeps in registers (a VLA
                             * it keeps on the stack) */

/* dst[x_j] (pixel stride dst_stride) = sum over slot rows a and slots c of weights[a * ks + c][query] *
 * rows[a][query * stride], query = x_j - (c - radius) * d, for the `run` keys x_j = x + j * d. With `checked`,
 * queries outside [0, width) count as weight 0 (and read key x instead): the keys near the row's ends. Every loop
 * has constant bounds once inlined, and GCC keeps the sums in registers only if it unrolls them all. */
ALWAYS_INLINE void key_run_sums(const float *const *rows, int64_t stride, const float *const *weights, int64_t x,
                                int64_t d, float *dst, int64_t dst_stride, int64_t width, const int64_t run,
                                const int checked, const int64_t ks, const int64_t hd) {
    const int64_t radius = (ks - 1) / 2, lanes = hd / BLOCK_LANES;
    __m256 acc[KEY_RUN * KEY_RUN_MAX_LANES];
    _Pragma("GCC unroll 32") for (int64_t i = 0; i < run * lanes; i++) acc[i] = _mm256_setzero_ps();
    _Pragma("GCC unroll 32") for (int64_t a = 0; a < ks; a++) {
        /* Query m of the run, x + m * d, reaches key j = m + c - radius in slot c. */
        _Pragma("GCC unroll 32") for (int64_t m = -radius; m < run + radius; m++) {
            const int64_t qx = x + m * d;
            const int inside = !checked || (qx >= 0 && qx < width);
            const float *src = rows[a] + (inside ? qx : x) * stride;
            __m256 sv[KEY_RUN_MAX_LANES];
            _Pragma("GCC unroll 32") for (int64_t l = 0; l < lanes; l++) sv[l] = _mm256_loadu_ps(src + l * BLOCK_LANES);
            _Pragma("GCC unroll 32") for (int64_t c = 0; c < ks; c++) {
                const int64_t j = m + c - radius;
                if (j < 0 || j >= run) continue;
                const __m256 w = checked ? _mm256_set1_ps(inside ? weights[a * ks + c][qx] : 0.0f)
                                         : _mm256_broadcast_ss(weights[a * ks + c] + qx);
                _Pragma("GCC unroll 32") for (int64_t l = 0; l < lanes; l++) {
                    acc[j * lanes + l] = _mm256_fmadd_ps(w, sv[l], acc[j * lanes + l]);
                }
            }
        }
    }
    _Pragma("GCC unroll 32") for (int64_t j = 0; j < run; j++) {
        _Pragma("GCC unroll 32") for (int64_t l = 0; l < lanes; l++) {
            _mm256_storeu_ps(dst + (x + j * d) * dst_stride + l * BLOCK_LANES, acc[j * lanes + l]);
        }
    }
}

/* Keys per chunk of a row: every head's runs advance through one chunk before the next, so the queries a chunk
 * reads stay in L1 across the heads instead of each head streaming the whole row. */
#define KEY_CHUNK 16

ALWAYS_INLINE void blocks_zero_key_rows(const problem_t *p, const float *grad_out, const float *q, const float *probs,
                                        const float *dlogits, float *grad_k, float *grad_v, int64_t row_begin,
                                        int64_t row_end, int64_t col_begin, int64_t col_end, const int64_t ks,
                                        const int64_t hd) {
    const int64_t radius = (ks - 1) / 2, width = p->width, heads = p->heads, per_group = heads / p->groups;
    const int64_t row_pixels = heads * hd, window = ks * ks;
    const int64_t ahead = radius * FN(max_dilation)(p), limit = p->batch * p->height * width;
    int64_t query_row[heads][ks], query_probs[heads][ks], next[heads];
    const float *q_rows[heads][ks], *dout_rows[heads][ks], *dlogit_at[heads][window], *prob_at[heads][window];
    float *zeros = calloc(width, sizeof(float));
    for (int64_t r = row_begin; r < row_end; r++) {
        for (int64_t h = 0; h < heads; h++) {
            const int64_t d = p->dilations[h / per_group];
            FN(key_row_queries)(p, r, h / per_group, query_row[h], query_probs[h]);
            for (int64_t a = 0; a < ks; a++) {
                const int64_t qr = query_row[h][a];
                /* A slot row outside the image reads this key row with zero weights: no branch in the runs. */
                const int64_t source = qr < 0 ? r : qr;
                q_rows[h][a] = q + source * width * p->q_stride + h * hd;
                dout_rows[h][a] = grad_out + source * width * row_pixels + h * hd;
                for (int64_t c = 0; c < ks; c++) {
                    const int64_t at = query_probs[h][a] + FN(slot_index)(p, h, a * ks + c, 0);
                    dlogit_at[h][a * ks + c] = qr < 0 ? zeros : dlogits + at;
                    prob_at[h][a * ks + c] = qr < 0 ? zeros : probs + at;
                }
            }
            /* Keys from radius * d on have every slot's query inside the row, up to radius * d from the end. */
            next[h] = radius * d > col_begin ? radius * d : col_begin;
        }
        float *gk = grad_k + r * width * row_pixels, *gv = grad_v + r * width * row_pixels;
        for (int64_t chunk = col_begin; chunk < col_end; chunk += KEY_CHUNK) {
            /* The query rows the next key row will first read. */
            const int64_t count = col_end - chunk < KEY_CHUNK ? col_end - chunk : KEY_CHUNK;
            FN(prefetch_pixels)(q, p->q_stride, (r + 1 + ahead) * width + chunk, count, limit);
            FN(prefetch_pixels)(grad_out, row_pixels, (r + 1 + ahead) * width + chunk, count, limit);
            for (int64_t h = 0; h < heads; h++) {
                /* Spans of KEY_RUN * d keys, d interleaved runs each. */
                const int64_t d = p->dilations[h / per_group], span = KEY_RUN * d;
                const int64_t end = col_end < width - radius * d ? col_end : width - radius * d;
                for (int64_t x = next[h]; x < chunk + KEY_CHUNK && x + span <= end; x += span) {
                    for (int64_t o = 0; o < d; o++) {
                        key_run_sums(q_rows[h], p->q_stride, dlogit_at[h], x + o, d, gk + h * hd, row_pixels, width,
                                     KEY_RUN, 0, ks, hd);
                        key_run_sums(dout_rows[h], row_pixels, prob_at[h], x + o, d, gv + h * hd, row_pixels, width,
                                     KEY_RUN, 0, ks, hd);
                    }
                    next[h] = x + span;
                }
            }
        }
        /* The keys at the row's ends and the remainder, one at a time: checked where a slot's query can be outside
         * the row. */
        for (int64_t h = 0; h < heads; h++) {
            const int64_t d = p->dilations[h / per_group], first = radius * d;
            const int64_t start = first > col_begin ? first : col_begin;
            for (int64_t e = col_begin; e < col_end; e++) {
                if (e == start) e = next[h]; /* keys [start, next[h]) went in runs */
                if (e >= col_end) break;
                if (e >= first && e + first < width) {
                    key_run_sums(q_rows[h], p->q_stride, dlogit_at[h], e, d, gk + h * hd, row_pixels, width, 1, 0, ks,
                                 hd);
                    key_run_sums(dout_rows[h], row_pixels, prob_at[h], e, d, gv + h * hd, row_pixels, width, 1, 0, ks,
                                 hd);
                } else {
                    key_run_sums(q_rows[h], p->q_stride, dlogit_at[h], e, d, gk + h * hd, row_pixels, width, 1, 1, ks,
                                 hd);
                    key_run_sums(dout_rows[h], row_pixels, prob_at[h], e, d, gv + h * hd, row_pixels, width, 1, 1, ks,
                                 hd);
                }
            }
        }
    }
    free(zeros);
}

static void blocks_zero_keys(const problem_t *p, const float *grad_out, const float *q, const float *probs,
                             const float *dlogits, float *grad_k, float *grad_v, int64_t row_begin, int64_t row_end,
                             int64_t col_begin, int64_t col_end) {
#define CALL(KS, HD)                                                                                                \
    blocks_zero_key_rows(p, grad_out, q, probs, dlogits, grad_k, grad_v, row_begin, row_end, col_begin, col_end, KS, HD)
    if (p->kernel_size == 3) {
        switch (p->head_dim) {
        case 8: CALL(3, 8); break;
        case 16: CALL(3, 16); break;
        case 24: CALL(3, 24); break;
        case 32: CALL(3, 32); break;
        default: CALL(3, p->head_dim); break;
        }
    } else {
        CALL(p->kernel_size, p->head_dim);
    }
#undef CALL
}
#endif

/* Entry points: specialise the loops for common head widths, else run them with a runtime width. */
#define DISPATCH_HEAD_DIM(call, hd)                                                                                 \
    switch (hd) {                                                                                                   \
    case 8: call(8); break;                                                                                         \
    case 16: call(16); break;                                                                                       \
    case 24: call(24); break;                                                                                       \
    case 32: call(32); break;                                                                                       \
    case 48: call(48); break;                                                                                       \
    case 64: call(64); break;                                                                                       \
    default: call(hd); break;                                                                                       \
    }

/* Forward for rows [row_begin, row_end) of (batch * height). */
void FN(msda_forward)(const problem_t *p, const SCALAR *q, const SCALAR *k, const SCALAR *v, SCALAR *out,
                      SCALAR *lse, int64_t row_begin, int64_t row_end) {
#if HAVE_BLOCKS
    if (p->head_dim % BLOCK_LANES == 0) {
        blocks_forward(p, q, k, v, out, lse, row_begin, row_end);
        return;
    }
#endif
#define CALL(HD) FN(forward_rows)(p, q, k, v, out, lse, row_begin, row_end, HD)
    DISPATCH_HEAD_DIM(CALL, p->head_dim)
#undef CALL
}

/* Backward, first pass, rows [row_begin, row_end): dq (skipped when grad_q is NULL), probs and dlogits. */
void FN(msda_backward_queries)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q, const SCALAR *k,
                               const SCALAR *v, const SCALAR *out, const SCALAR *lse, SCALAR *grad_q, SCALAR *probs,
                               SCALAR *dlogits, int64_t row_begin, int64_t row_end) {
#if HAVE_BLOCKS
    if (p->head_dim % BLOCK_LANES == 0) {
        blocks_backward_queries(p, grad_out, q, k, v, lse, grad_q, probs, dlogits, row_begin, row_end, 0, p->width);
        return;
    }
#endif
#define CALL(HD) FN(backward_query_rows)(p, grad_out, q, k, v, out, lse, grad_q, probs, dlogits, row_begin, row_end, HD)
    DISPATCH_HEAD_DIM(CALL, p->head_dim)
#undef CALL
}

/* Backward, second pass for border "zero", key rows [row_begin, row_end) of (batch * height). */
void FN(msda_backward_zero_keys)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q, const SCALAR *probs,
                                 const SCALAR *dlogits, SCALAR *grad_k, SCALAR *grad_v, int64_t row_begin,
                                 int64_t row_end) {
#if HAVE_BLOCKS
    if (p->head_dim % BLOCK_LANES == 0 && p->head_dim <= KEY_RUN_MAX_LANES * BLOCK_LANES) {
        blocks_zero_keys(p, grad_out, q, probs, dlogits, grad_k, grad_v, row_begin, row_end, 0, p->width);
        return;
    }
#endif
#define CALL(HD) FN(backward_zero_key_rows)(p, grad_out, q, probs, dlogits, grad_k, grad_v, row_begin, row_end, HD)
    DISPATCH_HEAD_DIM(CALL, p->head_dim)
#undef CALL
}

/* Columns per width tile of the one-sweep backward, at least: a stripe's query rows at full width (k and v `2 * reach
 * + 1` rows, q and grad_out as many again for the key pass) outgrow L2 at widths of several hundred pixels. */
#define TILE_COLUMNS 128

/* Tiles across the width for the one-sweep backward: only where both passes can run on a range of columns. */
ALWAYS_INLINE int64_t FN(width_tiles)(const problem_t *p) {
#if HAVE_BLOCKS
    if (p->head_dim % BLOCK_LANES == 0 && p->head_dim <= KEY_RUN_MAX_LANES * BLOCK_LANES)
        return p->width / TILE_COLUMNS > 1 ? p->width / TILE_COLUMNS : 1;
#endif
    return 1;
}

/* Column where width tile t of `tiles` starts: a multiple of 8, so every tile's query blocks are those of a
 * whole-row sweep. */
ALWAYS_INLINE int64_t FN(tile_edge)(const problem_t *p, int64_t t, int64_t tiles) {
    return t >= tiles ? p->width : p->width * t / tiles / 8 * 8;
}

/* One row of either pass on columns [col_begin, col_end): the whole row, or a width tile where width_tiles > 1. */
ALWAYS_INLINE void FN(query_cols)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q, const SCALAR *k,
                                  const SCALAR *v, const SCALAR *out, const SCALAR *lse, SCALAR *grad_q, SCALAR *probs,
                                  SCALAR *dlogits, int64_t r, int64_t col_begin, int64_t col_end) {
    if (col_begin >= col_end) return;
#if HAVE_BLOCKS
    if (col_begin > 0 || col_end < p->width) {
        blocks_backward_queries(p, grad_out, q, k, v, lse, grad_q, probs, dlogits, r, r + 1, col_begin, col_end);
        return;
    }
#endif
    FN(msda_backward_queries)(p, grad_out, q, k, v, out, lse, grad_q, probs, dlogits, r, r + 1);
}

ALWAYS_INLINE void FN(key_cols)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q, const SCALAR *probs,
                                const SCALAR *dlogits, SCALAR *grad_k, SCALAR *grad_v, int64_t row_begin,
                                int64_t row_end, int64_t col_begin, int64_t col_end) {
#if HAVE_BLOCKS
    if (col_begin > 0 || col_end < p->width) {
        blocks_zero_keys(p, grad_out, q, probs, dlogits, grad_k, grad_v, row_begin, row_end, col_begin, col_end);
        return;
    }
#endif
    FN(msda_backward_zero_keys)(p, grad_out, q, probs, dlogits, grad_k, grad_v, row_begin, row_end);
}

/* The whole backward for border "zero" in one sweep per unit of work: the second pass follows the first `reach`
 * rows behind, once every query row whose windows reach a key row is done, so probs and dlogits only need a ring of
 * 2 * reach + 1 rows (cache-resident) instead of a full-size buffer. A unit is one of `stripes` horizontal stripes
 * of one image; a stripe also sweeps the `reach` query rows beyond each of its edges (their probabilities, not
 * their dq, which belongs to the neighbouring stripe), so no two units write the same row. Wide images are also
 * swept in width tiles, one after the other, so that a tile's rows stay in L2; a tile's query pass likewise covers
 * the `reach` columns beyond each of its edges (probabilities only, rounded out to whole blocks). */
void FN(msda_backward_zero_fused)(const problem_t *whole, const SCALAR *grad_out, const SCALAR *q, const SCALAR *k,
                                  const SCALAR *v, const SCALAR *out, const SCALAR *lse, SCALAR *grad_q,
                                  SCALAR *grad_k, SCALAR *grad_v, int64_t stripes, int64_t unit_begin,
                                  int64_t unit_end) {
    problem_t p = *whole;
    const int64_t reach = (p.kernel_size - 1) / 2 * FN(max_dilation)(&p), height = p.height, width = p.width;
    const int64_t tiles = FN(width_tiles)(&p);
    p.prob_rows = 2 * reach + 1;
    const size_t ring_bytes = sizeof(SCALAR) * p.prob_rows * p.heads * p.kernel_size * p.kernel_size * p.width;
    SCALAR *probs = malloc(ring_bytes), *dlogits = malloc(ring_bytes);
    for (int64_t unit = unit_begin; unit < unit_end; unit++) {
        const int64_t b = unit / stripes, stripe = unit % stripes, first = b * height;
        const int64_t lo = height * stripe / stripes, hi = height * (stripe + 1) / stripes;
        const int64_t query_lo = lo > reach ? lo - reach : 0, query_hi = hi + reach < height ? hi + reach : height;
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t x0 = FN(tile_edge)(&p, t, tiles), x1 = FN(tile_edge)(&p, t + 1, tiles);
            const int64_t halo_lo = x0 > reach ? (x0 - reach) / 8 * 8 : 0;
            const int64_t halo_hi = x1 + reach < width ? (x1 + reach + 7) / 8 * 8 : width;
            for (int64_t y = query_lo; y < query_hi; y++) {
                SCALAR *own_grad_q = y >= lo && y < hi ? grad_q : NULL;
                FN(query_cols)(&p, grad_out, q, k, v, out, lse, NULL, probs, dlogits, first + y, halo_lo, x0);
                FN(query_cols)(&p, grad_out, q, k, v, out, lse, own_grad_q, probs, dlogits, first + y, x0, x1);
                FN(query_cols)(&p, grad_out, q, k, v, out, lse, NULL, probs, dlogits, first + y, x1, halo_hi);
                if (y - reach >= lo && y - reach < hi)
                    FN(key_cols)(&p, grad_out, q, probs, dlogits, grad_k, grad_v, first + y - reach,
                                 first + y - reach + 1, x0, x1);
            }
            const int64_t done = query_hi - reach > lo ? query_hi - reach : lo;
            FN(key_cols)(&p, grad_out, q, probs, dlogits, grad_k, grad_v, first + done, first + hi, x0, x1);
        }
    }
    free(probs), free(dlogits);
}

/* Backward, second pass for border "clamp", (batch, head) pairs [item_begin, item_end): several queries can share
 * a key in the same slot, so each pair scatters serially into its own slice of grad_k and grad_v (zeroed by the
 * caller). */
void FN(msda_backward_keys_scatter)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q,
                                    const SCALAR *probs, const SCALAR *dlogits, SCALAR *grad_k, SCALAR *grad_v,
                                    int64_t item_begin, int64_t item_end) {
    const int64_t ks = p->kernel_size, window = ks * ks, hd = p->head_dim;
    for (int64_t i = item_begin; i < item_end; i++) {
        const int64_t b = i / p->heads, h = i % p->heads, g = h / (p->heads / p->groups);
        for (int64_t y = 0; y < p->height; y++) {
            const int64_t r = b * p->height + y;
            for (int64_t x = 0; x < p->width; x++) {
                const int64_t pixel = r * p->width + x, query = pixel * p->heads + h;
                for (int64_t s = 0; s < window; s++) {
                    const int64_t at = FN(prob_row)(p, r) + FN(slot_index)(p, h, s, x);
                    const SCALAR prob = probs[at], dlogit = dlogits[at];
                    if (prob == 0 && dlogit == 0) continue;
                    const int64_t row = p->rows[(g * p->height + y) * ks + s / ks];
                    const int64_t col = p->cols[(g * p->width + x) * ks + s % ks];
                    const int64_t key = ((b * p->height + row) * p->width + col) * p->heads + h;
                    FN(axpy)(grad_k + key * hd, dlogit, q + pixel * p->q_stride + h * hd, hd);
                    FN(axpy)(grad_v + key * hd, prob, grad_out + query * hd, hd);
                }
            }
        }
    }
}

/* The entry points above over a whole range [0, total), split across `threads` OpenMP threads. */
void FN(msda_forward_parallel)(const problem_t *p, const SCALAR *q, const SCALAR *k, const SCALAR *v, SCALAR *out,
                               SCALAR *lse, int64_t total, int64_t threads) {
    SPLIT_RANGE(total, FN(msda_forward)(p, q, k, v, out, lse, begin, end));
}

void FN(msda_backward_queries_parallel)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q,
                                        const SCALAR *k, const SCALAR *v, const SCALAR *out, const SCALAR *lse,
                                        SCALAR *grad_q, SCALAR *probs, SCALAR *dlogits, int64_t total,
                                        int64_t threads) {
    SPLIT_RANGE(total, FN(msda_backward_queries)(p, grad_out, q, k, v, out, lse, grad_q, probs, dlogits, begin, end));
}

void FN(msda_backward_zero_fused_parallel)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q,
                                           const SCALAR *k, const SCALAR *v, const SCALAR *out, const SCALAR *lse,
                                           SCALAR *grad_q, SCALAR *grad_k, SCALAR *grad_v, int64_t stripes,
                                           int64_t total, int64_t threads) {
    SPLIT_RANGE(total, FN(msda_backward_zero_fused)(p, grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v, stripes,
                                                    begin, end));
}

void FN(msda_backward_keys_scatter_parallel)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q,
                                             const SCALAR *probs, const SCALAR *dlogits, SCALAR *grad_k,
                                             SCALAR *grad_v, int64_t total, int64_t threads) {
    SPLIT_RANGE(total, FN(msda_backward_keys_scatter)(p, grad_out, q, probs, dlogits, grad_k, grad_v, begin, end));
}

/* Whether this build splits work over OpenMP threads itself (the *_parallel entry points). */
int FN(msda_has_openmp)(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Whether the float32 query kernels run on 8-query blocks (AVX2 + FMA) in this build. */
int FN(msda_has_blocks)(void) { return HAVE_BLOCKS; }

#undef HAVE_BLOCKS
#undef problem_t
#undef ALWAYS_INLINE
#undef DISPATCH_HEAD_DIM
