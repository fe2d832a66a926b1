// The one-row decode step of a plain dense GQA transformer in fp32 (see native_step.py): one call per
// token does the whole forward, with the model's own weights read in place and the KV cache and every
// scratch vector allocated once by the caller. At batch 1 a token is 25 matrix-vector products (weights
// streamed from cache/memory once each) and ~100 tiny vector ops; here the tiny ones are plain loops
// that cost next to nothing, and nothing is allocated or dispatched per token.
//
// Built on the user's machine with -O3 -march=native (never shipped prebuilt): the matrix-vector loop
// is written with GCC vector types so it compiles to that machine's widest SIMD.

#include <cmath>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

extern "C" {

struct Layer {
    const float *attn_norm, *wq, *wk, *wv, *wo;  // (out, in) row-major, as nn.Linear stores them
    const float *ffn_norm, *w_gate, *w_up, *w_down;
    float *keys, *values;  // (max_len, n_kv_heads, head_dim): roped keys, values
    const float *q_norm, *k_norm;  // (head_dim): QK-norm weights, or null for a model without QK-norm
    float attn_eps, ffn_eps, qk_eps;
};

struct Model {
    int64_t dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab, max_len, embed_rows;
    float norm_eps;
    const float *embed, *norm, *head;  // embed (embed_rows, dim); head (vocab, dim)
    const float *cos, *sin;             // (>= max_len, head_dim): the model's RoPE tables
    const Layer *layers;
    // scratch, owned by the caller: x, h (dim); q (n_heads * head_dim); k, v (n_kv_heads * head_dim);
    // att (n_heads * head_dim); scores (max_len); gate, up (ffn_dim)
    float *x, *h, *q, *k, *v, *att, *scores, *gate, *up;
};

}  // extern "C"

namespace {

typedef float vec8 __attribute__((vector_size(32), aligned(4), may_alias));

inline float sum8(vec8 v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// a . b in vector lanes (a plain loop's sum is one serial chain: the compiler keeps its order)
float dot(const float *a, const float *b, int64_t n) {
    const int64_t whole = n - n % 8;
    vec8 acc = {};
    for (int64_t i = 0; i < whole; i += 8) acc += *(const vec8 *)(a + i) * *(const vec8 *)(b + i);
    float s = sum8(acc);
    for (int64_t i = whole; i < n; ++i) s += a[i] * b[i];
    return s;
}

// y[o] (+)= W[o, :] . x for o in [begin, end): four rows at a time so each load of x serves four rows.
void matvec_rows(const float *w, const float *x, float *y, int64_t in, int64_t begin, int64_t end, bool add) {
    const int64_t whole = in - in % 8;
    int64_t o = begin;
    for (; o + 4 <= end; o += 4) {
        const float *r0 = w + o * in, *r1 = r0 + in, *r2 = r1 + in, *r3 = r2 + in;
        vec8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t i = 0; i < whole; i += 8) {
            const vec8 xi = *(const vec8 *)(x + i);
            a0 += *(const vec8 *)(r0 + i) * xi;
            a1 += *(const vec8 *)(r1 + i) * xi;
            a2 += *(const vec8 *)(r2 + i) * xi;
            a3 += *(const vec8 *)(r3 + i) * xi;
        }
        float s0 = sum8(a0), s1 = sum8(a1), s2 = sum8(a2), s3 = sum8(a3);
        for (int64_t i = whole; i < in; ++i) {
            s0 += r0[i] * x[i];
            s1 += r1[i] * x[i];
            s2 += r2[i] * x[i];
            s3 += r3[i] * x[i];
        }
        if (add) {
            y[o] += s0, y[o + 1] += s1, y[o + 2] += s2, y[o + 3] += s3;
        } else {
            y[o] = s0, y[o + 1] = s1, y[o + 2] = s2, y[o + 3] = s3;
        }
    }
    for (; o < end; ++o) y[o] = add ? y[o] + dot(w + o * in, x, in) : dot(w + o * in, x, in);
}

// y = W x (or y += W x), W (out, in); split into blocks of rows over the threads.
void matvec(const float *w, const float *x, float *y, int64_t out, int64_t in, bool add, int threads) {
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
            const int64_t block = ((out + n - 1) / n + 3) / 4 * 4;  // a multiple of 4 rows per thread
            const int64_t begin = t * block < out ? t * block : out, end = begin + block < out ? begin + block : out;
            matvec_rows(w, x, y, in, begin, end, add);
        }
        return;
    }
#endif
    (void)threads;
    matvec_rows(w, x, y, in, 0, out, add);
}

// out = rms_norm(x) * weight, as F.rms_norm: x / sqrt(mean(x^2) + eps); `out` may be `x`
void rms_norm(const float *x, const float *weight, float *out, int64_t n, float eps) {
    const float scale = 1.f / std::sqrt(dot(x, x, n) / n + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * weight[i];
}

// apply_rope on each head of `x` (heads, head_dim): channel i pairs with i + head_dim / 2
void rope(float *x, int64_t heads, int64_t head_dim, const float *cos, const float *sin) {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < heads; ++h) {
        float *v = x + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

// One token at `pos` through the model; the residual stream ends in m->x.
void forward_token(const Model *m, int64_t token, int64_t pos, int threads) {
    const int64_t dim = m->dim, hd = m->head_dim, kv_width = m->n_kv_heads * hd;
    const int64_t group = m->n_heads / m->n_kv_heads;
    const float scale = 1.f / std::sqrt((float)hd);
    const float *cos = m->cos + pos * hd, *sin = m->sin + pos * hd;
    for (int64_t i = 0; i < dim; ++i) m->x[i] = m->embed[token * dim + i];
    for (int64_t l = 0; l < m->n_layers; ++l) {
        const Layer &L = m->layers[l];
        rms_norm(m->x, L.attn_norm, m->h, dim, L.attn_eps);
        matvec(L.wq, m->h, m->q, m->n_heads * hd, dim, false, threads);
        float *k = L.keys + pos * kv_width, *v = L.values + pos * kv_width;  // written into the cache
        matvec(L.wk, m->h, k, kv_width, dim, false, threads);
        matvec(L.wv, m->h, v, kv_width, dim, false, threads);
        if (L.q_norm) {  // QK-norm: each q and k head normalized before RoPE
            for (int64_t h = 0; h < m->n_heads; ++h) rms_norm(m->q + h * hd, L.q_norm, m->q + h * hd, hd, L.qk_eps);
            for (int64_t h = 0; h < m->n_kv_heads; ++h) rms_norm(k + h * hd, L.k_norm, k + h * hd, hd, L.qk_eps);
        }
        rope(m->q, m->n_heads, hd, cos, sin);
        rope(k, m->n_kv_heads, hd, cos, sin);
        for (int64_t head = 0; head < m->n_heads; ++head) {  // softmax(q.k * scale) . v over 0..pos
            const float *q = m->q + head * hd;
            const int64_t offset = (head / group) * hd;
            float top = -INFINITY;
            for (int64_t t = 0; t <= pos; ++t) {
                m->scores[t] = dot(q, L.keys + t * kv_width + offset, hd) * scale;
                top = m->scores[t] > top ? m->scores[t] : top;
            }
            float total = 0.f;
            for (int64_t t = 0; t <= pos; ++t) total += (m->scores[t] = std::exp(m->scores[t] - top));
            float *out = m->att + head * hd;
            for (int64_t i = 0; i < hd; ++i) out[i] = 0.f;
            for (int64_t t = 0; t <= pos; ++t) {
                const float p = m->scores[t] / total, *value = L.values + t * kv_width + offset;
                for (int64_t i = 0; i < hd; ++i) out[i] += p * value[i];
            }
        }
        matvec(L.wo, m->att, m->x, dim, m->n_heads * hd, true, threads);
        rms_norm(m->x, L.ffn_norm, m->h, dim, L.ffn_eps);
        matvec(L.w_gate, m->h, m->gate, m->ffn_dim, dim, false, threads);
        matvec(L.w_up, m->h, m->up, m->ffn_dim, dim, false, threads);
        for (int64_t i = 0; i < m->ffn_dim; ++i) {
            const float g = m->gate[i];
            m->gate[i] = g / (1.f + std::exp(-g)) * m->up[i];
        }
        matvec(L.w_down, m->gate, m->x, dim, m->ffn_dim, true, threads);
    }
}

}  // namespace

extern "C" {

// Feeds tokens[0..n) at positions start_pos.. (each one a step, so a prompt is prefilled token by token)
// and writes the last one's logits (vocab) into `logits`. Returns their greedy id (the first maximum, as
// torch's argmax; a NaN counts as the maximum), or -1 (nothing done) for an id outside the embedding or a
// position outside the cache.
int64_t darkhorse_step(const Model *m, const int64_t *tokens, int64_t n, int64_t start_pos, float *logits, int threads) {
    if (n < 1 || start_pos < 0 || start_pos + n > m->max_len) return -1;
    for (int64_t i = 0; i < n; ++i)
        if (tokens[i] < 0 || tokens[i] >= m->embed_rows) return -1;
    for (int64_t i = 0; i < n; ++i) forward_token(m, tokens[i], start_pos + i, threads);
    rms_norm(m->x, m->norm, m->h, m->dim, m->norm_eps);
    matvec(m->head, m->h, logits, m->vocab, m->dim, false, threads);
    int64_t best = 0;  // read while the logits are still in cache
    for (int64_t i = 1; i < m->vocab && !std::isnan(logits[best]); ++i)
        if (logits[i] > logits[best] || std::isnan(logits[i])) best = i;
    return best;
}

}  // extern "C"
