/*
 * float32 query kernels on blocks of 8 neighbouring queries of one image row, for AVX2 + FMA and head_dim a multiple
 * of 8. Included by msda_cpu.c in its float32 pass only.
 *
 * Per query the work is k*k dot products of length head_dim, a softmax over k*k logits and a k*k-term weighted sum.
 * Done one query at a time, each dot product ends in a horizontal reduction and the softmax runs on scalars. Here
 * each query's products stay in vector registers (8 partial sums per slot) and one transpose-and-add per slot turns
 * the 8 queries' partial sums into a single vector of logits, lane j belonging to query j: the softmax and its
 * exp/log then run 8 queries at a time, and the weighted sums broadcast one probability per slot into head_dim-wide
 * FMAs. q, k and v are read in their own (pixel, head, head_dim) layout; nothing is transposed.
 *
 * Finding the keys costs nothing per query where the window is a pure shift (every block of border "zero", and
 * border "clamp" away from the edges): lane j's key in a slot is j pixels after lane 0's, so a block needs one start
 * pixel per slot (and for border "zero" one bit per slot and lane saying whether that key is inside the image).
 * Only border "clamp" near the edges builds a table of k*k x 8 key pointers.
 *
 * Window slots that hold no real key point at a zero vector: border "zero" then needs no special case (logit 0, no
 * value), border "clamp" adds -inf to those logits. Lanes past the end of a row point every read at the zero vector
 * and are never stored.
 */
#include <immintrin.h>
#include <math.h>

#define BLOCK_LANES 8
/* Vectors of one head kept in registers at a time (64 floats): wider heads run in panels. Scratch arrays inside the
 * loops have this fixed size, as gcc keeps a variable-length array declared in a loop in memory even where its
 * length turns out constant. */
#define BLOCK_MAX_CHUNKS 8
/* Before each loop over the window's slots: a 3x3 window unrolls fully, so per-slot vectors live in registers. */
#define SLOTS _Pragma("GCC unroll 9")
#define BLOCK_SMALL_WINDOW 9

/* exp for the softmax, whose arguments are <= 0 up to rounding: Cody-Waite reduction and the Cephes expf
 * polynomial (about 1 ulp). Arguments below -87.3 give 0, NaN stays NaN. */
static inline __m256 exp8(__m256 x) {
    const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
    /* max/min return their second operand when either is NaN: keep x second so NaN survives. */
    x = _mm256_max_ps(_mm256_set1_ps(-87.33654f), x);
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
    poly = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(poly, _mm256_castsi256_ps(power)));
}

/* log for the softmax normaliser, a sum of exps that is >= 1 (finite, positive, normal); NaN stays NaN. Cephes
 * logf: split off the exponent, then a polynomial on the mantissa around 1. */
static inline __m256 log8(__m256 x) {
    const __m256 input = x;
    const __m256i bits = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
    /* mantissa in [0.5, 1) */
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                                   _mm256_set1_epi32(0x3f000000)));
    const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
    m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
    const __m256 z = _mm256_mul_ps(m, m);
    __m256 y = _mm256_set1_ps(7.0376836292e-2f);
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
    y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
    __m256 result = _mm256_add_ps(m, y);
    result = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), result);
    return _mm256_blendv_ps(result, input, _mm256_cmp_ps(input, input, _CMP_UNORD_Q));
}

/* How a block's keys are found, per head group: BLOCK_SHIFTED where every key of every lane is real and a pure shift
 * of its query (lane j's key in slot s is start[s] + j), BLOCK_MASKED where that shift holds for the real keys and
 * the rest are zero keys (border "zero" near the image's edges, and partial blocks), BLOCK_TABLE otherwise (border
 * "clamp" near the edges): a pointer per slot and lane. */
enum { BLOCK_TABLE, BLOCK_SHIFTED, BLOCK_MASKED };

/* The keys (or values) of one block and head group. */
typedef struct {
    const float *data;      /* the tensor */
    int64_t stride;         /* elements between its pixels */
    const float *const *at; /* BLOCK_TABLE: (k*k, 8) pointers to the keys' pixels, or zeros */
    const int64_t *start;   /* shifted modes: per slot, lane 0's key pixel (outside the image where masked) */
    const uint32_t *lanes;  /* BLOCK_MASKED: per slot, bit j set where lane j's key is real */
    const float *zeros;     /* a zero pixel */
} block_keys_t;

/* Pixel (head offset not included) of lane j's key in slot s. */
ALWAYS_INLINE const float *block_slot(const block_keys_t *keys, const int mode, int64_t s, int64_t j) {
    if (mode == BLOCK_TABLE) return keys->at[s * BLOCK_LANES + j];
    if (mode == BLOCK_MASKED && !((keys->lanes[s] >> j) & 1)) return keys->zeros;
    return keys->data + (keys->start[s] + j) * keys->stride;
}

/* Fills the window of the block of `count` queries starting at (b, y, x0) in head group g and returns its mode.
 * BLOCK_TABLE fills first_at / second_at and bias (-inf for the slots that border "clamp" leaves out of the
 * softmax, else 0); the shifted modes fill start and lanes. */
ALWAYS_INLINE int block_window(const problem_t *p, int64_t b, int64_t y, int64_t x0, int64_t count, int64_t g,
                               int64_t *start, uint32_t *lanes, const float *first, int64_t first_stride,
                               const float **first_at, const float *second, int64_t second_stride,
                               const float **second_at, const float *zeros, float *bias) {
    const int64_t ks = p->kernel_size, radius = (ks - 1) / 2, width = p->width, dilation = p->dilations[g];
    const int64_t *rows = p->rows + (g * p->height + y) * ks;
    const uint8_t *row_valid = p->row_valid + (g * p->height + y) * ks;
    if (p->zero_border) {
        /* Border "zero" tables are pure shifts wherever a key is real (see neighborhood.py). */
        uint32_t all = 0xff;
        for (int64_t c = 0; c < ks; c++) {
            /* Lanes j in [lo, hi) have their key column x0 + j + shift inside the image. */
            const int64_t shift = (c - radius) * dilation, first = x0 + shift;
            const int64_t lo = first < 0 ? -first : 0, hi = width - first < count ? width - first : count;
            const uint32_t bits = lo < hi ? (1u << hi) - (1u << lo) : 0;
            for (int64_t a = 0; a < ks; a++) {
                start[a * ks + c] = (b * p->height + rows[a]) * width + first;
                lanes[a * ks + c] = row_valid[a] ? bits : 0;
                all &= lanes[a * ks + c];
            }
        }
        return all == 0xff ? BLOCK_SHIFTED : BLOCK_MASKED;
    }
    int rows_inside = 1;
    for (int64_t a = 0; a < ks; a++) rows_inside &= row_valid[a] && rows[a] == y + (a - radius) * dilation;
    if (rows_inside && count == BLOCK_LANES && x0 - radius * dilation >= 0 &&
        x0 + BLOCK_LANES - 1 + radius * dilation < width) {
        for (int64_t a = 0; a < ks; a++)
            for (int64_t c = 0; c < ks; c++)
                start[a * ks + c] = (b * p->height + rows[a]) * width + x0 + (c - radius) * dilation;
        return BLOCK_SHIFTED;
    }
    for (int64_t a = 0; a < ks; a++) {
        const int64_t row_start = (b * p->height + rows[a]) * width;
        for (int64_t c = 0; c < ks; c++) {
            const int64_t s = a * ks + c;
            for (int64_t j = 0; j < BLOCK_LANES; j++) {
                const int inside = j < count;
                const int64_t at = (g * width + (inside ? x0 + j : x0)) * ks + c;
                const int real = inside && row_valid[a] && p->col_valid[at];
                const int64_t pixel = row_start + p->cols[at];
                first_at[s * BLOCK_LANES + j] = real ? first + pixel * first_stride : zeros;
                second_at[s * BLOCK_LANES + j] = real ? second + pixel * second_stride : zeros;
                bias[s * BLOCK_LANES + j] = real || !inside ? 0.0f : -INFINITY;
            }
        }
    }
    return BLOCK_TABLE;
}

/* One pair of lanes (2 * pair, 2 * pair + 1) of block_products. Per slot, the transpose-and-add of the 8 lanes'
 * partial sums is a tree of horizontal adds: each pair's two sums are folded into it as soon as they exist, so only
 * two vectors per slot stay live between pairs (registers, where 8 lanes' partial sums per slot would spill). */
ALWAYS_INLINE void block_pair_products(const problem_t *p, const float *a, int64_t a_stride, const block_keys_t *keys,
                                       const int mode, int64_t row, int64_t x0, int64_t count, int64_t h,
                                       const int pair, __m256 *low, __m256 *high, __m256 *products,
                                       const int64_t window, const int64_t hd) {
    const int64_t j0 = 2 * pair, j1 = j0 + 1, chunks = hd / BLOCK_LANES;
    const float *a0 = j0 < count ? a + (row * p->width + x0 + j0) * a_stride + h * hd : keys->zeros;
    const float *a1 = j1 < count ? a + (row * p->width + x0 + j1) * a_stride + h * hd : keys->zeros;
    /* The pair's two query vectors stay in registers across the slots, unless the head is wider than a panel. */
    const int kept = chunks <= BLOCK_MAX_CHUNKS;
    __m256 v0[BLOCK_MAX_CHUNKS], v1[BLOCK_MAX_CHUNKS];
    for (int64_t c = 0; kept && c < chunks; c++) {
        v0[c] = _mm256_loadu_ps(a0 + c * BLOCK_LANES);
        v1[c] = _mm256_loadu_ps(a1 + c * BLOCK_LANES);
    }
#define QUERY(v, a, c) (kept ? v[c] : _mm256_loadu_ps(a + (c) * BLOCK_LANES))
    SLOTS for (int64_t s = 0; s < window; s++) {
        const float *b0 = block_slot(keys, mode, s, j0) + h * hd, *b1 = block_slot(keys, mode, s, j1) + h * hd;
        __m256 acc0 = _mm256_mul_ps(QUERY(v0, a0, 0), _mm256_loadu_ps(b0));
        __m256 acc1 = _mm256_mul_ps(QUERY(v1, a1, 0), _mm256_loadu_ps(b1));
        for (int64_t c = 1; c < chunks; c++) {
            acc0 = _mm256_fmadd_ps(QUERY(v0, a0, c), _mm256_loadu_ps(b0 + c * BLOCK_LANES), acc0);
            acc1 = _mm256_fmadd_ps(QUERY(v1, a1, c), _mm256_loadu_ps(b1 + c * BLOCK_LANES), acc1);
        }
        const __m256 sums = _mm256_hadd_ps(acc0, acc1);
        if (pair == 0) low[s] = sums;
        if (pair == 1) low[s] = _mm256_hadd_ps(low[s], sums);
        if (pair == 2) high[s] = sums;
        if (pair == 3) {
            const __m256 both = _mm256_hadd_ps(high[s], sums);
            products[s] = _mm256_add_ps(_mm256_permute2f128_ps(low[s], both, 0x20),
                                        _mm256_permute2f128_ps(low[s], both, 0x31));
        }
    }
#undef QUERY
}

/* The k*k products a_j . b_{s,j} of the block, as k*k vectors indexed by lane j, where a_j is the head's vector at
 * query j (or zeros past `count`) and b_{s,j} = block_slot(keys, mode, s, j) + h * hd the one of slot s's key.
 * low_scratch and high_scratch: k*k vectors of scratch for windows larger than 3x3. */
ALWAYS_INLINE void block_products(const problem_t *p, const float *a, int64_t a_stride, const block_keys_t *keys,
                                  const int mode, int64_t row, int64_t x0, int64_t count, int64_t h,
                                  __m256 *products, __m256 *low_scratch, __m256 *high_scratch,
                                  const int64_t window, const int64_t hd) {
    /* Local arrays of constant length for small windows: registers once the slot loops unroll. */
    __m256 low_here[BLOCK_SMALL_WINDOW], high_here[BLOCK_SMALL_WINDOW];
    __m256 *low = window <= BLOCK_SMALL_WINDOW ? low_here : low_scratch;
    __m256 *high = window <= BLOCK_SMALL_WINDOW ? high_here : high_scratch;
#define PAIR(n) block_pair_products(p, a, a_stride, keys, mode, row, x0, count, h, n, low, high, products, window, hd)
    PAIR(0);
    PAIR(1);
    PAIR(2);
    PAIR(3);
#undef PAIR
}

/* dst (pixel stride dst_stride, head offset h*hd) of lane j < count = sum over slots of weight[s][j] *
 * (block_slot(values, mode, s, j) + h * hd). */
ALWAYS_INLINE void block_weighted_sums(const problem_t *p, float *dst, int64_t dst_stride,
                                       const block_keys_t *values, const int mode, int64_t row, int64_t x0,
                                       int64_t count, int64_t h, const float *weight, const int64_t window,
                                       const int64_t hd) {
    const int64_t chunks = hd / BLOCK_LANES;
    for (int64_t j = 0; j < count; j++) {
        float *out = dst + (row * p->width + x0 + j) * dst_stride + h * hd;
        for (int64_t panel = 0; panel < chunks; panel += BLOCK_MAX_CHUNKS) {
            const int64_t width = chunks - panel < BLOCK_MAX_CHUNKS ? chunks - panel : BLOCK_MAX_CHUNKS;
            __m256 acc[BLOCK_MAX_CHUNKS];
            for (int64_t c = 0; c < width; c++) acc[c] = _mm256_setzero_ps();
            SLOTS for (int64_t s = 0; s < window; s++) {
                const float *vs = block_slot(values, mode, s, j) + h * hd + panel * BLOCK_LANES;
                const __m256 w = _mm256_broadcast_ss(weight + s * BLOCK_LANES + j);
                for (int64_t c = 0; c < width; c++)
                    acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vs + c * BLOCK_LANES), acc[c]);
            }
            for (int64_t c = 0; c < width; c++) _mm256_storeu_ps(out + (panel + c) * BLOCK_LANES, acc[c]);
        }
    }
}

/* Asks for the block's q one image row later and its k and v `ahead` rows beyond that: the rows the sweep will
 * first read on the next row. */
ALWAYS_INLINE void block_prefetch(const problem_t *p, const float *q, const float *k, const float *v, int64_t r,
                                  int64_t x0, int64_t count, int64_t ahead) {
    const int64_t next = (r + 1) * p->width + x0, limit = p->batch * p->height * p->width;
    FN(prefetch_pixels)(q, p->q_stride, next, count, limit);
    FN(prefetch_pixels)(k, p->k_stride, next + ahead * p->width, count, limit);
    FN(prefetch_pixels)(v, p->v_stride, next + ahead * p->width, count, limit);
}

/* Window-sized scratch of the per-head kernels, declared once per call of the row loops (outside every loop, where
 * gcc turns arrays of constant length into registers). */
typedef struct {
    __m256 *logit, *dprob, *low, *high; /* k*k vectors each */
    float *weight;                      /* (k*k, 8) */
} block_scratch_t;

/* Forward of one head of a block: out and lse of its lanes < count. */
ALWAYS_INLINE void block_forward_head(const problem_t *p, const float *q, const block_keys_t *keys,
                                      const block_keys_t *values, const int mode, const float *bias, float *out,
                                      float *lse, int64_t r, int64_t x0, int64_t count, int64_t h,
                                      block_scratch_t *scratch, const int64_t window, const int64_t hd) {
    const __m256 scale = _mm256_set1_ps((float)p->scale);
    __m256 *logit = scratch->logit;
    float *prob = scratch->weight, block_lse[BLOCK_LANES];
    block_products(p, q, p->q_stride, keys, mode, r, x0, count, h, logit, scratch->low, scratch->high, window, hd);
    __m256 top = _mm256_set1_ps(-INFINITY), total = _mm256_setzero_ps();
    SLOTS for (int64_t s = 0; s < window; s++) {
        logit[s] = mode != BLOCK_TABLE ? _mm256_mul_ps(logit[s], scale)
                                       : _mm256_fmadd_ps(logit[s], scale, _mm256_loadu_ps(bias + s * BLOCK_LANES));
        top = _mm256_max_ps(top, logit[s]);
    }
    SLOTS for (int64_t s = 0; s < window; s++) {
        logit[s] = exp8(_mm256_sub_ps(logit[s], top));
        total = _mm256_add_ps(total, logit[s]);
    }
    const __m256 inverse = _mm256_div_ps(_mm256_set1_ps(1.0f), total);
    SLOTS for (int64_t s = 0; s < window; s++)
        _mm256_storeu_ps(prob + s * BLOCK_LANES, _mm256_mul_ps(logit[s], inverse));
    _mm256_storeu_ps(block_lse, _mm256_add_ps(top, log8(total)));
    block_weighted_sums(p, out, p->heads * hd, values, mode, r, x0, count, h, prob, window, hd);
    for (int64_t j = 0; j < count; j++) lse[(r * p->width + x0 + j) * p->heads + h] = block_lse[j];
}

/* Runs HEAD(mode) for every head of group g with the mode a compile-time constant. */
#define BLOCK_HEADS(mode, HEAD)                                                                                     \
    do {                                                                                                            \
        for (int64_t h = g * per_group; h < (g + 1) * per_group; h++) {                                             \
            if (mode == BLOCK_SHIFTED) HEAD(BLOCK_SHIFTED);                                                         \
            else if (mode == BLOCK_MASKED) HEAD(BLOCK_MASKED);                                                      \
            else HEAD(BLOCK_TABLE);                                                                                 \
        }                                                                                                           \
    } while (0)

ALWAYS_INLINE void blocks_forward_rows(const problem_t *p, const float *q, const float *k, const float *v, float *out,
                                       float *lse, int64_t row_begin, int64_t row_end, const int64_t window,
                                       const int64_t hd) {
    const int64_t per_group = p->heads / p->groups;
    const int64_t ahead = (p->kernel_size - 1) / 2 * FN(max_dilation)(p);
    float *zeros = calloc(p->heads * hd, sizeof(float));
    const float *k_at[window * BLOCK_LANES], *v_at[window * BLOCK_LANES];
    float bias[window * BLOCK_LANES], weight[window * BLOCK_LANES];
    int64_t start[window];
    uint32_t lanes[window];
    __m256 logit[window], dprob[window], low[window], high[window];
    block_scratch_t scratch = {logit, dprob, low, high, weight};
    const block_keys_t keys = {k, p->k_stride, k_at, start, lanes, zeros};
    const block_keys_t values = {v, p->v_stride, v_at, start, lanes, zeros};
    for (int64_t r = row_begin; r < row_end; r++) {
        const int64_t b = r / p->height, y = r % p->height;
        for (int64_t x0 = 0; x0 < p->width; x0 += BLOCK_LANES) {
            const int64_t count = p->width - x0 < BLOCK_LANES ? p->width - x0 : BLOCK_LANES;
            block_prefetch(p, q, k, v, r, x0, count, ahead);
            for (int64_t g = 0; g < p->groups; g++) {
                const int mode = block_window(p, b, y, x0, count, g, start, lanes, k, p->k_stride, k_at, v,
                                              p->v_stride, v_at, zeros, bias);
#define HEAD(MODE)                                                                                                   \
    block_forward_head(p, q, &keys, &values, MODE, bias, out, lse, r, x0, count, h, &scratch, window, hd)
                BLOCK_HEADS(mode, HEAD);
#undef HEAD
            }
        }
    }
    free(zeros);
}

/* Backward, first pass, of one head of a block. The softmax's delta (sum over the window of p * dp) equals
 * grad_out . out, so out is not read. */
ALWAYS_INLINE void block_backward_head(const problem_t *p, const float *grad_out, const float *q,
                                       const block_keys_t *keys, const block_keys_t *values, const int mode,
                                       const float *bias, const float *lse, float *grad_q, float *row_probs,
                                       float *row_dlogits, int64_t r, int64_t x0, int64_t count, int64_t h,
                                       block_scratch_t *scratch, const int64_t window, const int64_t hd) {
    const __m256 scale = _mm256_set1_ps((float)p->scale);
    __m256 *logit = scratch->logit, *dprob = scratch->dprob;
    float *dlogit = scratch->weight, block_lse[BLOCK_LANES];
    block_products(p, q, p->q_stride, keys, mode, r, x0, count, h, logit, scratch->low, scratch->high, window, hd);
    block_products(p, grad_out, p->heads * hd, values, mode, r, x0, count, h, dprob, scratch->low, scratch->high,
                   window, hd);
    for (int64_t j = 0; j < BLOCK_LANES; j++)
        block_lse[j] = j < count ? lse[(r * p->width + x0 + j) * p->heads + h] : 0.0f;
    const __m256 row_lse = _mm256_loadu_ps(block_lse);
    __m256 delta = _mm256_setzero_ps();
    SLOTS for (int64_t s = 0; s < window; s++) {
        logit[s] = mode != BLOCK_TABLE ? _mm256_mul_ps(logit[s], scale)
                                       : _mm256_fmadd_ps(logit[s], scale, _mm256_loadu_ps(bias + s * BLOCK_LANES));
        logit[s] = exp8(_mm256_sub_ps(logit[s], row_lse));
        delta = _mm256_fmadd_ps(logit[s], dprob[s], delta);
    }
    SLOTS for (int64_t s = 0; s < window; s++) {
        const __m256 dl = _mm256_mul_ps(_mm256_mul_ps(logit[s], _mm256_sub_ps(dprob[s], delta)), scale);
        _mm256_storeu_ps(dlogit + s * BLOCK_LANES, dl);
        const int64_t at = FN(slot_index)(p, h, s, x0);
        if (count == BLOCK_LANES) {
            _mm256_storeu_ps(row_probs + at, logit[s]);
            _mm256_storeu_ps(row_dlogits + at, dl);
        } else {
            float prob[BLOCK_LANES];
            _mm256_storeu_ps(prob, logit[s]);
            memcpy(row_probs + at, prob, count * sizeof(float));
            memcpy(row_dlogits + at, dlogit + s * BLOCK_LANES, count * sizeof(float));
        }
    }
    if (grad_q)
        block_weighted_sums(p, grad_q, p->heads * hd, keys, mode, r, x0, count, h, dlogit, window, hd);
}

/* Backward, first pass, on columns [col_begin, col_end) of each row (col_begin a multiple of 8, so the blocks are
 * those of a whole-row sweep). */
ALWAYS_INLINE void blocks_backward_query_rows(const problem_t *p, const float *grad_out, const float *q,
                                              const float *k, const float *v, const float *lse, float *grad_q,
                                              float *probs, float *dlogits, int64_t row_begin, int64_t row_end,
                                              int64_t col_begin, int64_t col_end, const int64_t window,
                                              const int64_t hd) {
    const int64_t per_group = p->heads / p->groups, row_pixels = p->heads * hd;
    const int64_t ahead = (p->kernel_size - 1) / 2 * FN(max_dilation)(p);
    float *zeros = calloc(p->heads * hd, sizeof(float));
    const float *k_at[window * BLOCK_LANES], *v_at[window * BLOCK_LANES];
    float bias[window * BLOCK_LANES], weight[window * BLOCK_LANES];
    int64_t start[window];
    uint32_t lanes[window];
    __m256 logit[window], dprob[window], low[window], high[window];
    block_scratch_t scratch = {logit, dprob, low, high, weight};
    const block_keys_t keys = {k, p->k_stride, k_at, start, lanes, zeros};
    const block_keys_t values = {v, p->v_stride, v_at, start, lanes, zeros};
    for (int64_t r = row_begin; r < row_end; r++) {
        const int64_t b = r / p->height, y = r % p->height, row_probs = FN(prob_row)(p, r);
        for (int64_t x0 = col_begin; x0 < col_end; x0 += BLOCK_LANES) {
            const int64_t count = col_end - x0 < BLOCK_LANES ? col_end - x0 : BLOCK_LANES;
            block_prefetch(p, q, k, v, r, x0, count, ahead);
            FN(prefetch_pixels)(grad_out, row_pixels, (r + 1) * p->width + x0, count, p->batch * p->height * p->width);
            for (int64_t g = 0; g < p->groups; g++) {
                const int mode = block_window(p, b, y, x0, count, g, start, lanes, k, p->k_stride, k_at, v,
                                              p->v_stride, v_at, zeros, bias);
#define HEAD(MODE)                                                                                                   \
    block_backward_head(p, grad_out, q, &keys, &values, MODE, bias, lse, grad_q, probs + row_probs,                 \
                        dlogits + row_probs, r, x0, count, h, &scratch, window, hd)
                BLOCK_HEADS(mode, HEAD);
#undef HEAD
            }
        }
    }
    free(zeros);
}

#undef BLOCK_HEADS

#define DISPATCH_BLOCKS(call, window, hd)                                                                          \
    if (window == 9) {                                                                                              \
        switch (hd) {                                                                                               \
        case 8: call(9, 8); break;                                                                                  \
        case 16: call(9, 16); break;                                                                                \
        case 24: call(9, 24); break;                                                                                \
        case 32: call(9, 32); break;                                                                                \
        case 64: call(9, 64); break;                                                                                \
        default: call(9, hd); break;                                                                                \
        }                                                                                                           \
    } else {                                                                                                        \
        call(window, hd);                                                                                           \
    }

static void blocks_forward(const problem_t *p, const float *q, const float *k, const float *v, float *out, float *lse,
                           int64_t row_begin, int64_t row_end) {
    const int64_t window = p->kernel_size * p->kernel_size;
#define CALL(WINDOW, HD) blocks_forward_rows(p, q, k, v, out, lse, row_begin, row_end, WINDOW, HD)
    DISPATCH_BLOCKS(CALL, window, p->head_dim)
#undef CALL
}

static void blocks_backward_queries(const problem_t *p, const float *grad_out, const float *q, const float *k,
                                    const float *v, const float *lse, float *grad_q, float *probs, float *dlogits,
                                    int64_t row_begin, int64_t row_end, int64_t col_begin, int64_t col_end) {
    const int64_t window = p->kernel_size * p->kernel_size;
#define CALL(WINDOW, HD)                                                                                             \
    blocks_backward_query_rows(p, grad_out, q, k, v, lse, grad_q, probs, dlogits, row_begin, row_end, col_begin,      \
                               col_end, WINDOW, HD)
    DISPATCH_BLOCKS(CALL, window, p->head_dim)
#undef CALL
}

#undef DISPATCH_BLOCKS
