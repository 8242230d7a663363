/*
 * float32 query kernels on blocks of 8 neighbouring queries of one image row, for AVX2 + FMA and head_dim a multiple
 * of 8. Included by msda_cpu.c in its float32 pass only.
 *
 * Per query the work is k*k dot products of length head_dim, a softmax over k*k logits and a k*k-term weighted sum.
 * Done one query at a time, each dot product ends in a horizontal reduction and the softmax runs on scalars. Here
 * each query's products stay in vector registers (8 partial sums per slot) and one transpose-and-add turns the 8
 * queries' partial sums into a single vector of logits, lane j belonging to query j: the softmax and its exp/log
 * then run 8 queries at a time, and the weighted sums broadcast one probability per slot into head_dim-wide FMAs.
 * q, k and v are read in their own (pixel, head, head_dim) layout; nothing is transposed.
 *
 * Window slots that hold no real key point at a zero vector: border "zero" then needs no special case (logit 0, no
 * value), border "clamp" adds -inf to those logits. Lanes past the end of a row point every read at the zero vector
 * and are never stored.
 */
#include <immintrin.h>
#include <math.h>

#define BLOCK_LANES 8

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

/* v[0..7] -> one vector whose lane j is the sum of v[j]'s lanes. */
static inline __m256 lane_sums8(const __m256 *v) {
    const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Window pointers of a block of `count` queries starting at (b, y, x0), head group g, for two tensors at once: per
 * slot and lane, (k*k, 8), the key's pixel in `first` and `second` (head offset not included), or `zeros` where
 * there is no real key and for lanes >= count. bias is -inf for the slots that border "clamp" leaves out of the
 * softmax, else 0. */
ALWAYS_INLINE void block_window(const problem_t *p, int64_t b, int64_t y, int64_t x0, int64_t count, int64_t g,
                                const float *first, int64_t first_stride, const float **first_at, const float *second,
                                int64_t second_stride, const float **second_at, const float *zeros, float *bias) {
    const int64_t ks = p->kernel_size, radius = (ks - 1) / 2, width = p->width, dilation = p->dilations[g];
    const int64_t *rows = p->rows + (g * p->height + y) * ks;
    const uint8_t *row_valid = p->row_valid + (g * p->height + y) * ks;
    int rows_inside = 1;
    for (int64_t a = 0; a < ks; a++) rows_inside &= row_valid[a] && rows[a] == y + (a - radius) * dilation;
    const int interior = rows_inside && count == BLOCK_LANES && x0 - radius * dilation >= 0 &&
                         x0 + BLOCK_LANES - 1 + radius * dilation < width;
    for (int64_t a = 0; a < ks; a++) {
        const int64_t row_start = (b * p->height + rows[a]) * width;
        for (int64_t c = 0; c < ks; c++) {
            const int64_t s = a * ks + c;
            if (interior) {
                /* Every key is real and a pure shift of its query: pointers step by one pixel across the lanes. */
                const int64_t start = row_start + x0 + (c - radius) * dilation;
                for (int64_t j = 0; j < BLOCK_LANES; j++) {
                    first_at[s * BLOCK_LANES + j] = first + (start + j) * first_stride;
                    second_at[s * BLOCK_LANES + j] = second + (start + j) * second_stride;
                    bias[s * BLOCK_LANES + j] = 0.0f;
                }
                continue;
            }
            for (int64_t j = 0; j < BLOCK_LANES; j++) {
                const int inside = j < count;
                const int64_t at = (g * width + (inside ? x0 + j : x0)) * ks + c;
                const int real = inside && row_valid[a] && p->col_valid[at];
                const int64_t pixel = row_start + p->cols[at];
                first_at[s * BLOCK_LANES + j] = real ? first + pixel * first_stride : zeros;
                second_at[s * BLOCK_LANES + j] = real ? second + pixel * second_stride : zeros;
                bias[s * BLOCK_LANES + j] = real || p->zero_border || !inside ? 0.0f : -INFINITY;
            }
        }
    }
}

/* Sum over the block's lanes j of the k*k products a_j . b_{s,j}, as k*k vectors indexed by lane, where a_j is the
 * head's vector at query j (or zeros past `count`) and b_{s,j} = b_at[s][j] + h * hd the one of slot s's key. */
ALWAYS_INLINE void block_products(const problem_t *p, const float *a, int64_t a_stride, const float *const *b_at,
                                  int64_t row, int64_t x0, int64_t count, int64_t h, const float *zeros,
                                  __m256 *products, const int64_t window, const int64_t hd) {
    __m256 partial[window][BLOCK_LANES];
    for (int64_t j = 0; j < BLOCK_LANES; j++) {
        const float *aj = j < count ? a + (row * p->width + x0 + j) * a_stride + h * hd : zeros;
        __m256 av[hd / BLOCK_LANES];
        for (int64_t c = 0; c < hd / BLOCK_LANES; c++) av[c] = _mm256_loadu_ps(aj + c * BLOCK_LANES);
        for (int64_t s = 0; s < window; s++) {
            const float *bs = b_at[s * BLOCK_LANES + j] + h * hd;
            __m256 acc = _mm256_mul_ps(av[0], _mm256_loadu_ps(bs));
            for (int64_t c = 1; c < hd / BLOCK_LANES; c++)
                acc = _mm256_fmadd_ps(av[c], _mm256_loadu_ps(bs + c * BLOCK_LANES), acc);
            partial[s][j] = acc;
        }
    }
    for (int64_t s = 0; s < window; s++) products[s] = lane_sums8(partial[s]);
}

/* dst (pixel stride dst_stride, head offset h*hd) of lane j < count = sum over slots of weight[s][j] *
 * (src_at[s][j] + h * hd). */
ALWAYS_INLINE void block_weighted_sums(const problem_t *p, float *dst, int64_t dst_stride, const float *const *src_at,
                                       int64_t row, int64_t x0, int64_t count, int64_t h, const float *weight,
                                       const int64_t window, const int64_t hd) {
    for (int64_t j = 0; j < count; j++) {
        __m256 acc[hd / BLOCK_LANES];
        for (int64_t c = 0; c < hd / BLOCK_LANES; c++) acc[c] = _mm256_setzero_ps();
        for (int64_t s = 0; s < window; s++) {
            const float *vs = src_at[s * BLOCK_LANES + j] + h * hd;
            const __m256 w = _mm256_broadcast_ss(weight + s * BLOCK_LANES + j);
            for (int64_t c = 0; c < hd / BLOCK_LANES; c++)
                acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vs + c * BLOCK_LANES), acc[c]);
        }
        float *out = dst + (row * p->width + x0 + j) * dst_stride + h * hd;
        for (int64_t c = 0; c < hd / BLOCK_LANES; c++) _mm256_storeu_ps(out + c * BLOCK_LANES, acc[c]);
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

ALWAYS_INLINE void blocks_forward_rows(const problem_t *p, const float *q, const float *k, const float *v, float *out,
                                       float *lse, int64_t row_begin, int64_t row_end, const int64_t window,
                                       const int64_t hd) {
    const int64_t per_group = p->heads / p->groups, row_pixels = p->heads * hd;
    const int64_t ahead = (p->kernel_size - 1) / 2 * FN(max_dilation)(p);
    const __m256 scale = _mm256_set1_ps((float)p->scale);
    float *zeros = calloc(p->heads * hd, sizeof(float));
    const float *k_at[window * BLOCK_LANES], *v_at[window * BLOCK_LANES];
    float bias[window * BLOCK_LANES], prob[window * BLOCK_LANES], block_lse[BLOCK_LANES];
    __m256 logit[window];
    for (int64_t r = row_begin; r < row_end; r++) {
        const int64_t b = r / p->height, y = r % p->height;
        for (int64_t x0 = 0; x0 < p->width; x0 += BLOCK_LANES) {
            const int64_t count = p->width - x0 < BLOCK_LANES ? p->width - x0 : BLOCK_LANES;
            block_prefetch(p, q, k, v, r, x0, count, ahead);
            for (int64_t g = 0; g < p->groups; g++) {
                block_window(p, b, y, x0, count, g, k, p->k_stride, k_at, v, p->v_stride, v_at, zeros, bias);
                for (int64_t h = g * per_group; h < (g + 1) * per_group; h++) {
                    block_products(p, q, p->q_stride, k_at, r, x0, count, h, zeros, logit, window, hd);
                    __m256 top = _mm256_set1_ps(-INFINITY), total = _mm256_setzero_ps();
                    for (int64_t s = 0; s < window; s++) {
                        logit[s] = _mm256_fmadd_ps(logit[s], scale, _mm256_loadu_ps(bias + s * BLOCK_LANES));
                        top = _mm256_max_ps(top, logit[s]);
                    }
                    for (int64_t s = 0; s < window; s++) {
                        logit[s] = exp8(_mm256_sub_ps(logit[s], top));
                        total = _mm256_add_ps(total, logit[s]);
                    }
                    const __m256 inverse = _mm256_div_ps(_mm256_set1_ps(1.0f), total);
                    for (int64_t s = 0; s < window; s++)
                        _mm256_storeu_ps(prob + s * BLOCK_LANES, _mm256_mul_ps(logit[s], inverse));
                    _mm256_storeu_ps(block_lse, _mm256_add_ps(top, log8(total)));
                    block_weighted_sums(p, out, row_pixels, v_at, r, x0, count, h, prob, window, hd);
                    for (int64_t j = 0; j < count; j++) lse[(r * p->width + x0 + j) * p->heads + h] = block_lse[j];
                }
            }
        }
    }
    free(zeros);
}

/* Backward, first pass, on columns [col_begin, col_end) of each row (col_begin a multiple of 8, so the blocks are
 * those of a whole-row sweep). The softmax's delta (sum over the window of p * dp) equals grad_out . out, so out is
 * not read. */
ALWAYS_INLINE void blocks_backward_query_rows(const problem_t *p, const float *grad_out, const float *q,
                                              const float *k, const float *v, const float *lse, float *grad_q,
                                              float *probs, float *dlogits, int64_t row_begin, int64_t row_end,
                                              int64_t col_begin, int64_t col_end, const int64_t window,
                                              const int64_t hd) {
    const int64_t per_group = p->heads / p->groups, row_pixels = p->heads * hd;
    const int64_t ahead = (p->kernel_size - 1) / 2 * FN(max_dilation)(p);
    const __m256 scale = _mm256_set1_ps((float)p->scale);
    float *zeros = calloc(p->heads * hd, sizeof(float));
    const float *k_at[window * BLOCK_LANES], *v_at[window * BLOCK_LANES];
    float bias[window * BLOCK_LANES], prob[window * BLOCK_LANES], dlogit[window * BLOCK_LANES];
    float block_lse[BLOCK_LANES];
    __m256 logit[window], dprob[window];
    for (int64_t r = row_begin; r < row_end; r++) {
        const int64_t b = r / p->height, y = r % p->height, row_probs = FN(prob_row)(p, r);
        for (int64_t x0 = col_begin; x0 < col_end; x0 += BLOCK_LANES) {
            const int64_t count = col_end - x0 < BLOCK_LANES ? col_end - x0 : BLOCK_LANES;
            block_prefetch(p, q, k, v, r, x0, count, ahead);
            FN(prefetch_pixels)(grad_out, row_pixels, (r + 1) * p->width + x0, count, p->batch * p->height * p->width);
            for (int64_t g = 0; g < p->groups; g++) {
                block_window(p, b, y, x0, count, g, k, p->k_stride, k_at, v, p->v_stride, v_at, zeros, bias);
                for (int64_t h = g * per_group; h < (g + 1) * per_group; h++) {
                    block_products(p, q, p->q_stride, k_at, r, x0, count, h, zeros, logit, window, hd);
                    block_products(p, grad_out, row_pixels, v_at, r, x0, count, h, zeros, dprob, window, hd);
                    for (int64_t j = 0; j < BLOCK_LANES; j++)
                        block_lse[j] = j < count ? lse[(r * p->width + x0 + j) * p->heads + h] : 0.0f;
                    const __m256 row_lse = _mm256_loadu_ps(block_lse);
                    __m256 delta = _mm256_setzero_ps();
                    for (int64_t s = 0; s < window; s++) {
                        logit[s] = _mm256_fmadd_ps(logit[s], scale, _mm256_loadu_ps(bias + s * BLOCK_LANES));
                        logit[s] = exp8(_mm256_sub_ps(logit[s], row_lse));
                        delta = _mm256_fmadd_ps(logit[s], dprob[s], delta);
                    }
                    for (int64_t s = 0; s < window; s++) {
                        const __m256 dl = _mm256_mul_ps(_mm256_mul_ps(logit[s], _mm256_sub_ps(dprob[s], delta)), scale);
                        _mm256_storeu_ps(prob + s * BLOCK_LANES, logit[s]);
                        _mm256_storeu_ps(dlogit + s * BLOCK_LANES, dl);
                    }
                    for (int64_t s = 0; s < window; s++) {
                        const int64_t at = row_probs + FN(slot_index)(p, h, s, x0);
                        memcpy(probs + at, prob + s * BLOCK_LANES, count * sizeof(float));
                        memcpy(dlogits + at, dlogit + s * BLOCK_LANES, count * sizeof(float));
                    }
                    if (grad_q) block_weighted_sums(p, grad_q, row_pixels, k_at, r, x0, count, h, dlogit, window, hd);
                }
            }
        }
    }
    free(zeros);
}

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
