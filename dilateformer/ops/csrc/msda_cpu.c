/*
 * MSDA on the CPU in one pass per direction: every query reads its own k*k window of keys and values straight
 * from q, k and v, so nothing of window size is ever written to memory.
 *
 * Built once per machine by dilateformer/ops/native.py (plain C, no PyTorch headers), included twice: with
 * SCALAR = float, SUFFIX = _f32 and with SCALAR = double, SUFFIX = _f64 (tgmath.h picks expf/exp to match).
 * Work is split into ranges of image rows (or of (batch, head) pairs) so Python threads can run the ranges in
 * parallel: ctypes releases the GIL for the duration of each call.
 *
 * Layout: q, k, v are (B, H, W, heads, head_dim) with heads and head_dim dense and a uniform stride between
 * pixels (q_stride etc.), which covers both contiguous tensors and the q/k/v views of a fused qkv projection.
 * out, grads are contiguous; lse, probs and dlogits are (B, H, W, heads[, k*k]) contiguous.
 *
 * Windows come as per-axis tables built by neighborhood.py: rows[g][y][a] is the key row of query row y at slot a
 * in head group g, with row_valid saying whether that slot exists. Border "zero": an invalid slot is a zero key
 * (logit 0, part of the softmax, no value); border "clamp": it is left out of the softmax.
 */
#include <tgmath.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
} FN(msda_problem);

#define problem_t FN(msda_problem)

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* head_dim is passed as a compile-time constant where the dispatchers below know it, so these loops unroll and the
 * query row and the accumulators stay in vector registers across the k*k window slots. */
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
                            FN(axpy)(dq, dlogit, k + pixel[s] * p->k_stride + h * hd, hd);
                        }
                        probs[item * window + s] = prob;
                        dlogits[item * window + s] = dlogit;
                    }
                    for (int64_t i = 0; i < hd; i++) grad_q[item * hd + i] = dq[i];
                }
            }
        }
    }
}

/* ---- Border "zero", vectorised along image rows ------------------------------------------------------------
 * For one image row and one head, q, k and v rows are transposed into (head_dim, width) scratch so that every
 * window slot becomes a shifted, contiguous slice: logits, softmax and weighted sums all vectorise across x with
 * no horizontal reductions. Transposed key rows carry radius*dilation zero columns on each side, which are the
 * zero keys of the border. Probabilities and logit gradients for the backward are laid out (B, heads, k*k, H, W).
 */

typedef struct {
    SCALAR *rows;  /* (head_dim, padded width) for the slot rows in use */
    SCALAR *query, *out;  /* (head_dim, width) */
    SCALAR *logit;  /* (k*k, width) */
    SCALAR *top, *total;  /* (width) */
} FN(row_scratch);

/* src row (width pixels, pixel stride `stride`, head offset h*hd) -> dst (hd, padded) at column `pad`. */
ALWAYS_INLINE void FN(transpose_row)(SCALAR *restrict dst, const SCALAR *restrict src, int64_t width, int64_t stride,
                                     int64_t pad, int64_t padded, const int64_t hd) {
    for (int64_t i = 0; i < hd; i++) {
        SCALAR *line = dst + i * padded;
        for (int64_t x = 0; x < pad; x++) line[x] = 0;
        for (int64_t x = pad + width; x < padded; x++) line[x] = 0;
    }
    /* Strided reads from an L1-resident row, contiguous writes: much cheaper than the other loop order. */
    for (int64_t i = 0; i < hd; i++) {
        SCALAR *line = dst + i * padded + pad;
        for (int64_t x = 0; x < width; x++) line[x] = src[x * stride + i];
    }
}

ALWAYS_INLINE void FN(untranspose_row)(SCALAR *restrict dst, const SCALAR *restrict src, int64_t width, int64_t stride,
                                       const int64_t hd) {
    for (int64_t x = 0; x < width; x++)
        for (int64_t i = 0; i < hd; i++) dst[x * stride + i] = src[i * width + x];
}

/* acc[x] += sum_i a[i][x] * b[i][x + shift] over a (hd, width) and b (hd, padded) */
ALWAYS_INLINE void FN(rows_dot)(SCALAR *restrict acc, const SCALAR *restrict a, const SCALAR *restrict b, int64_t width,
                                int64_t padded, int64_t shift, const int64_t hd) {
    for (int64_t i = 0; i < hd; i++) {
        const SCALAR *ai = a + i * width, *bi = b + i * padded + shift;
#pragma omp simd
        for (int64_t x = 0; x < width; x++) acc[x] += ai[x] * bi[x];
    }
}

/* out[i][x] += w[x] * b[i][x + shift] */
ALWAYS_INLINE void FN(rows_axpy)(SCALAR *restrict out, const SCALAR *restrict w, const SCALAR *restrict b, int64_t width,
                                 int64_t padded, int64_t shift, const int64_t hd) {
    for (int64_t i = 0; i < hd; i++) {
        SCALAR *oi = out + i * width;
        const SCALAR *bi = b + i * padded + shift;
#pragma omp simd
        for (int64_t x = 0; x < width; x++) oi[x] += w[x] * bi[x];
    }
}

/* A ring of transposed, zero-padded rows of one or two tensors for one head. Query rows are visited in order,
 * so each key row is transposed once and then reused by the k consecutive query rows whose windows contain it. */
typedef struct {
    SCALAR *first, *second;  /* (ring, hd, padded) each; second may be NULL */
    int64_t *tag;  /* flattened row (b * H + row) held by each ring slot, or -1 */
    int64_t ring, padded;
} FN(row_ring);

ALWAYS_INLINE FN(row_ring) FN(ring_new)(int64_t ring, int64_t padded, int two, const int64_t hd) {
    FN(row_ring) cache = {malloc(sizeof(SCALAR) * ring * hd * padded),
                          two ? malloc(sizeof(SCALAR) * ring * hd * padded) : NULL, malloc(sizeof(int64_t) * ring),
                          ring, padded};
    for (int64_t i = 0; i < ring; i++) cache.tag[i] = -1;
    return cache;
}

ALWAYS_INLINE void FN(ring_reset)(FN(row_ring) *cache) {
    for (int64_t i = 0; i < cache->ring; i++) cache->tag[i] = -1;
}

ALWAYS_INLINE void FN(ring_free)(FN(row_ring) *cache) { free(cache->first), free(cache->second), free(cache->tag); }

/* Pointers to the transposed rows of `row` (flattened b * H + row) in both tensors, transposing on a miss. */
ALWAYS_INLINE void FN(ring_get)(FN(row_ring) *cache, int64_t row, const SCALAR *first, int64_t first_stride,
                                const SCALAR *second, int64_t second_stride, int64_t width, int64_t h, int64_t pad,
                                int64_t padded, SCALAR **first_row, SCALAR **second_row, const int64_t hd) {
    const int64_t slot = row % cache->ring;
    *first_row = cache->first + slot * hd * padded;
    if (second_row) *second_row = cache->second + slot * hd * padded;
    if (cache->tag[slot] == row) return;
    cache->tag[slot] = row;
    FN(transpose_row)(*first_row, first + row * width * first_stride + h * hd, width, first_stride, pad, padded, hd);
    if (second_row)
        FN(transpose_row)(*second_row, second + row * width * second_stride + h * hd, width, second_stride, pad,
                          padded, hd);
}

/* The transposed k (and v) rows of the window of query row y, head h, in k_rows[a] / v_rows[a]; returns a bit
 * mask of the window rows inside the image. */
ALWAYS_INLINE uint64_t FN(load_window_rows)(const problem_t *p, FN(row_ring) * cache, const SCALAR *k,
                                            const SCALAR *v, int64_t b, int64_t y, int64_t h, int64_t dilation,
                                            int64_t padded, SCALAR **k_rows, SCALAR **v_rows, const int64_t hd) {
    const int64_t ks = p->kernel_size, radius = (ks - 1) / 2;
    uint64_t inside = 0;
    for (int64_t a = 0; a < ks; a++) {
        const int64_t row = y + (a - radius) * dilation;
        if (row < 0 || row >= p->height) continue;
        inside |= (uint64_t)1 << a;
        FN(ring_get)(cache, b * p->height + row, k, p->k_stride, v, p->v_stride, p->width, h, radius * dilation,
                     padded, &k_rows[a], v_rows ? &v_rows[a] : NULL, hd);
    }
    return inside;
}

/* Logits (already scaled) of query row `query` (hd, width) against every window slot; rows outside the image give
 * the zero keys' logit 0. */
ALWAYS_INLINE void FN(row_logits)(const problem_t *p, const SCALAR *query, SCALAR *const *k_rows, uint64_t inside,
                                  SCALAR *logit, int64_t dilation, int64_t padded, const int64_t hd) {
    const int64_t ks = p->kernel_size, width = p->width;
    for (int64_t a = 0; a < ks; a++) {
        for (int64_t c = 0; c < ks; c++) {
            SCALAR *line = logit + (a * ks + c) * width;
            for (int64_t x = 0; x < width; x++) line[x] = 0;
            if (!(inside >> a & 1)) continue;
            FN(rows_dot)(line, query, k_rows[a], width, padded, c * dilation, hd);
#pragma omp simd
            for (int64_t x = 0; x < width; x++) line[x] *= (SCALAR)p->scale;
        }
    }
}

ALWAYS_INLINE int64_t FN(max_dilation)(const problem_t *p) {
    int64_t largest = 1;
    for (int64_t g = 0; g < p->groups; g++) largest = p->dilations[g] > largest ? p->dilations[g] : largest;
    return largest;
}

ALWAYS_INLINE void FN(forward_zero_rows)(const problem_t *p, const SCALAR *q, const SCALAR *k, const SCALAR *v,
                                         SCALAR *out, SCALAR *lse, int64_t row_begin, int64_t row_end, const int64_t hd) {
    const int64_t ks = p->kernel_size, window = ks * ks, width = p->width, per_group = p->heads / p->groups;
    const int64_t reach = (ks - 1) * FN(max_dilation)(p), row_pixels = p->heads * hd;
    FN(row_ring) cache = FN(ring_new)(reach + 1, width + reach, 1, hd);
    SCALAR *k_rows[ks], *v_rows[ks];
    SCALAR *query = malloc(sizeof(SCALAR) * hd * width), *acc = malloc(sizeof(SCALAR) * hd * width);
    SCALAR *logit = malloc(sizeof(SCALAR) * window * width), *top = malloc(sizeof(SCALAR) * width);
    SCALAR *total = malloc(sizeof(SCALAR) * width);
    for (int64_t h = 0; h < p->heads; h++) {
        const int64_t dilation = p->dilations[h / per_group], padded = width + (ks - 1) * dilation;
        FN(ring_reset)(&cache);
        for (int64_t r = row_begin; r < row_end; r++) {
            const int64_t b = r / p->height, y = r % p->height;
            FN(transpose_row)(query, q + r * width * p->q_stride + h * hd, width, p->q_stride, 0, width, hd);
            const uint64_t inside = FN(load_window_rows)(p, &cache, k, v, b, y, h, dilation, padded, k_rows, v_rows, hd);
            FN(row_logits)(p, query, k_rows, inside, logit, dilation, padded, hd);
            for (int64_t x = 0; x < width; x++) top[x] = -INFINITY, total[x] = 0;
            for (int64_t s = 0; s < window; s++) {
                const SCALAR *line = logit + s * width;
#pragma omp simd
                for (int64_t x = 0; x < width; x++) top[x] = line[x] > top[x] || isnan(line[x]) ? line[x] : top[x];
            }
            for (int64_t s = 0; s < window; s++) {
                SCALAR *line = logit + s * width;
#pragma omp simd
                for (int64_t x = 0; x < width; x++) {
                    line[x] = exp(line[x] - top[x]);
                    total[x] += line[x];
                }
            }
            for (int64_t i = 0; i < hd * width; i++) acc[i] = 0;
            for (int64_t a = 0; a < ks; a++) {
                if (!(inside >> a & 1)) continue;
                for (int64_t c = 0; c < ks; c++)
                    FN(rows_axpy)(acc, logit + (a * ks + c) * width, v_rows[a], width, padded, c * dilation, hd);
            }
            for (int64_t x = 0; x < width; x++) {
                const SCALAR inverse = 1 / total[x];
                SCALAR *o = out + (r * width + x) * row_pixels + h * hd;
                for (int64_t i = 0; i < hd; i++) o[i] = acc[i * width + x] * inverse;
                lse[(r * width + x) * p->heads + h] = top[x] + log(total[x]);
            }
        }
    }
    FN(ring_free)(&cache);
    free(query), free(acc), free(logit), free(top), free(total);
}

/* Backward, first pass: dq, and the probabilities and logit gradients, (B, heads, k*k, H, W). */
ALWAYS_INLINE void FN(backward_zero_query_rows)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q,
                                                const SCALAR *k, const SCALAR *v, const SCALAR *out, const SCALAR *lse,
                                                SCALAR *grad_q, SCALAR *probs, SCALAR *dlogits, int64_t row_begin,
                                                int64_t row_end, const int64_t hd) {
    const int64_t ks = p->kernel_size, window = ks * ks, width = p->width, per_group = p->heads / p->groups;
    const int64_t reach = (ks - 1) * FN(max_dilation)(p), row_pixels = p->heads * hd;
    FN(row_ring) cache = FN(ring_new)(reach + 1, width + reach, 1, hd);
    SCALAR *k_rows[ks], *v_rows[ks];
    SCALAR *query = malloc(sizeof(SCALAR) * hd * width), *dout = malloc(sizeof(SCALAR) * hd * width);
    SCALAR *dq = malloc(sizeof(SCALAR) * hd * width), *logit = malloc(sizeof(SCALAR) * window * width);
    SCALAR *delta = malloc(sizeof(SCALAR) * width), *dprob = malloc(sizeof(SCALAR) * width);
    for (int64_t h = 0; h < p->heads; h++) {
        const int64_t dilation = p->dilations[h / per_group], padded = width + (ks - 1) * dilation;
        FN(ring_reset)(&cache);
        for (int64_t r = row_begin; r < row_end; r++) {
            const int64_t b = r / p->height, y = r % p->height;
            FN(transpose_row)(query, q + r * width * p->q_stride + h * hd, width, p->q_stride, 0, width, hd);
            FN(transpose_row)(dout, grad_out + r * width * row_pixels + h * hd, width, row_pixels, 0, width, hd);
            for (int64_t x = 0; x < width; x++) {
                const SCALAR *o = out + (r * width + x) * row_pixels + h * hd;
                const SCALAR *g = grad_out + (r * width + x) * row_pixels + h * hd;
                delta[x] = FN(dot)(o, g, hd);
            }
            const uint64_t inside = FN(load_window_rows)(p, &cache, k, v, b, y, h, dilation, padded, k_rows, v_rows, hd);
            FN(row_logits)(p, query, k_rows, inside, logit, dilation, padded, hd);
            for (int64_t i = 0; i < hd * width; i++) dq[i] = 0;
            const SCALAR *row_lse = lse + r * width * p->heads + h;
            for (int64_t a = 0; a < ks; a++) {
                for (int64_t c = 0; c < ks; c++) {
                    const int64_t s = a * ks + c, at = (((b * p->heads + h) * window + s) * p->height + y) * width;
                    SCALAR *prob = probs + at, *dlogit = dlogits + at;
                    if (!(inside >> a & 1)) {
                        for (int64_t x = 0; x < width; x++) prob[x] = dlogit[x] = 0;
                        continue;
                    }
                    const SCALAR *line = logit + s * width;
                    for (int64_t x = 0; x < width; x++) dprob[x] = 0;
                    FN(rows_dot)(dprob, dout, v_rows[a], width, padded, c * dilation, hd);
#pragma omp simd
                    for (int64_t x = 0; x < width; x++) {
                        prob[x] = exp(line[x] - row_lse[x * p->heads]);
                        dlogit[x] = prob[x] * (dprob[x] - delta[x]) * (SCALAR)p->scale;
                    }
                    FN(rows_axpy)(dq, dlogit, k_rows[a], width, padded, c * dilation, hd);
                }
            }
            FN(untranspose_row)(grad_q + r * width * row_pixels + h * hd, dq, width, row_pixels, hd);
        }
    }
    FN(ring_free)(&cache);
    free(query), free(dout), free(dq), free(logit), free(delta), free(dprob);
}

/* Backward, second pass: each key row gathers dk and dv from the query rows whose windows reach it. */
ALWAYS_INLINE void FN(backward_zero_key_rows)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q,
                                              const SCALAR *probs, const SCALAR *dlogits, SCALAR *grad_k,
                                              SCALAR *grad_v, int64_t row_begin, int64_t row_end, const int64_t hd) {
    const int64_t ks = p->kernel_size, window = ks * ks, width = p->width, radius = (ks - 1) / 2;
    const int64_t per_group = p->heads / p->groups, row_pixels = p->heads * hd;
    const int64_t reach = (ks - 1) * FN(max_dilation)(p);
    FN(row_ring) cache = FN(ring_new)(reach + 1, width + reach, 1, hd);
    SCALAR *prob = malloc(sizeof(SCALAR) * (width + reach)), *dlogit = malloc(sizeof(SCALAR) * (width + reach));
    SCALAR *dk = malloc(sizeof(SCALAR) * hd * width), *dv = malloc(sizeof(SCALAR) * hd * width);
    for (int64_t h = 0; h < p->heads; h++) {
        const int64_t dilation = p->dilations[h / per_group], pad = radius * dilation, padded = width + 2 * pad;
        FN(ring_reset)(&cache);
        for (int64_t r = row_begin; r < row_end; r++) {
            const int64_t b = r / p->height, y = r % p->height;
            for (int64_t i = 0; i < hd * width; i++) dk[i] = dv[i] = 0;
            for (int64_t a = 0; a < ks; a++) {
                const int64_t qy = y - (a - radius) * dilation;
                if (qy < 0 || qy >= p->height) continue;
                SCALAR *query, *dout;
                FN(ring_get)(&cache, b * p->height + qy, q, p->q_stride, grad_out, row_pixels, width, h, pad, padded,
                             &query, &dout, hd);
                for (int64_t c = 0; c < ks; c++) {
                    const int64_t s = a * ks + c, shift = (2 * radius - c) * dilation;
                    const int64_t at = (((b * p->heads + h) * window + s) * p->height + qy) * width;
                    for (int64_t x = 0; x < pad; x++) prob[x] = dlogit[x] = prob[pad + width + x] = dlogit[pad + width + x] = 0;
                    for (int64_t x = 0; x < width; x++) prob[pad + x] = probs[at + x], dlogit[pad + x] = dlogits[at + x];
                    for (int64_t i = 0; i < hd; i++) {
                        SCALAR *dki = dk + i * width, *dvi = dv + i * width;
                        const SCALAR *qi = query + i * padded + shift, *gi = dout + i * padded + shift;
                        const SCALAR *ps = prob + shift, *ds = dlogit + shift;
#pragma omp simd
                        for (int64_t x = 0; x < width; x++) {
                            dki[x] += ds[x] * qi[x];
                            dvi[x] += ps[x] * gi[x];
                        }
                    }
                }
            }
            FN(untranspose_row)(grad_k + r * width * row_pixels + h * hd, dk, width, row_pixels, hd);
            FN(untranspose_row)(grad_v + r * width * row_pixels + h * hd, dv, width, row_pixels, hd);
        }
    }
    FN(ring_free)(&cache);
    free(prob), free(dlogit), free(dk), free(dv);
}

/* Entry points: specialise the row loops for common head widths, else run them with a runtime width. */
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

/* Border "clamp" (any window table) entry points. Forward for rows [row_begin, row_end) of (batch * height). */
void FN(msda_forward)(const problem_t *p, const SCALAR *q, const SCALAR *k, const SCALAR *v, SCALAR *out,
                      SCALAR *lse, int64_t row_begin, int64_t row_end) {
#define CALL(HD) FN(forward_rows)(p, q, k, v, out, lse, row_begin, row_end, HD)
    DISPATCH_HEAD_DIM(CALL, p->head_dim)
#undef CALL
}

/* Backward, first pass, rows [row_begin, row_end): dq, and per slot the probability and the logit gradient
 * (zero for slots that are not real keys), laid out (B, H, W, heads, k*k), for the scatter pass. */
void FN(msda_backward_queries)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q, const SCALAR *k,
                               const SCALAR *v, const SCALAR *out, const SCALAR *lse, SCALAR *grad_q, SCALAR *probs,
                               SCALAR *dlogits, int64_t row_begin, int64_t row_end) {
#define CALL(HD) FN(backward_query_rows)(p, grad_out, q, k, v, out, lse, grad_q, probs, dlogits, row_begin, row_end, HD)
    DISPATCH_HEAD_DIM(CALL, p->head_dim)
#undef CALL
}

/* Border "zero" entry points, rows [row_begin, row_end) of (batch * height); probs and dlogits are
 * (B, heads, k*k, H, W) here. */
void FN(msda_forward_zero)(const problem_t *p, const SCALAR *q, const SCALAR *k, const SCALAR *v, SCALAR *out,
                           SCALAR *lse, int64_t row_begin, int64_t row_end) {
#define CALL(HD) FN(forward_zero_rows)(p, q, k, v, out, lse, row_begin, row_end, HD)
    DISPATCH_HEAD_DIM(CALL, p->head_dim)
#undef CALL
}

void FN(msda_backward_zero_queries)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q, const SCALAR *k,
                                    const SCALAR *v, const SCALAR *out, const SCALAR *lse, SCALAR *grad_q,
                                    SCALAR *probs, SCALAR *dlogits, int64_t row_begin, int64_t row_end) {
#define CALL(HD)                                                                                                      \
    FN(backward_zero_query_rows)(p, grad_out, q, k, v, out, lse, grad_q, probs, dlogits, row_begin, row_end, HD)
    DISPATCH_HEAD_DIM(CALL, p->head_dim)
#undef CALL
}

void FN(msda_backward_zero_keys)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q, const SCALAR *probs,
                                 const SCALAR *dlogits, SCALAR *grad_k, SCALAR *grad_v, int64_t row_begin,
                                 int64_t row_end) {
#define CALL(HD) FN(backward_zero_key_rows)(p, grad_out, q, probs, dlogits, grad_k, grad_v, row_begin, row_end, HD)
    DISPATCH_HEAD_DIM(CALL, p->head_dim)
#undef CALL
}

/* Backward, second pass for border "clamp", (batch, head) pairs [item_begin, item_end): several queries can share
 * a key in the same slot, so each pair scatters serially into its own slice of grad_k and grad_v (zeroed by the
 * caller). */
void FN(msda_backward_keys_scatter)(const problem_t *p, const SCALAR *grad_out, const SCALAR *q,
                                    const SCALAR *probs, const SCALAR *dlogits, SCALAR *grad_k, SCALAR *grad_v,
                                    int64_t item_begin, int64_t item_end) {
    const int64_t ks = p->kernel_size, window = ks * ks, hd = p->head_dim;
    for (int64_t i = item_begin; i < item_end; i++) {
        const int64_t b = i / p->heads, h = i % p->heads;
        for (int64_t y = 0; y < p->height; y++) {
            for (int64_t x = 0; x < p->width; x++) {
                const int64_t pixel = (b * p->height + y) * p->width + x, query = pixel * p->heads + h;
                for (int64_t s = 0; s < window; s++) {
                    const SCALAR prob = probs[query * window + s], dlogit = dlogits[query * window + s];
                    if (prob == 0 && dlogit == 0) continue;
                    const int64_t g = h / (p->heads / p->groups);
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

#undef problem_t
#undef ALWAYS_INLINE
#undef DISPATCH_HEAD_DIM
