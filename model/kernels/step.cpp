// The parts of a decode step around the matmuls, each one call instead of several torch ops (ops nlg::*):
//
//   rms_norm(x, w, eps)                 x / sqrt(mean(x^2) + eps) * w per row
//   add_rms_norm(x, residual, w, eps)   the same of s = x + residual, and s (the next residual)
//   decode_attention(q, k, v, lengths)  a few query tokens per row, each against its first lengths[b, t] keys
//   silu_mul(x)                          silu(gate) * up of the merged gate/up projection's output
//   rope(x, cos, sin)                    rotary embedding of the q and k heads
// each with the instruction set to run last (named as the matmul's).
//
// All fp32. Small calls are the point: at a decode row torch's rms_norm is several kernels (~11 us), this
// is one pass (~3 us with the call). The norms and rotary are plain loops the compiler vectorizes; the
// attention's dot products, softmax and value sums and SwiGLU's exp are AVX-512 or AVX2 intrinsics; each
// is built for its instruction set (GCC target attributes) and picked at run time like the matmuls, with a
// portable scalar path.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// y = x * rsqrt(mean(x^2) + eps) * w over one row of d.
inline __attribute__((always_inline)) void norm_row(const float* x, const float* w, float eps, int64_t d, float* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] = x[i] * r * w[i];
}

// s = a + b, then y = norm(s).
inline __attribute__((always_inline)) void add_norm_row(const float* a, const float* b, const float* w, float eps,
                                                        int64_t d, float* s, float* y) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) s[i] = a[i] + b[i];
  norm_row(s, w, eps, d, y);
}

// Vector helpers of the attention, one set per instruction set: scores_n (N heads' scaled dot products with
// each of len keys, s (N, len)), softmax(s, n) in place, values_n (out (N, d) = p (N, len) @ v), for N up to 8
// (`attend_group` takes a group's heads 8 at a time). Each built for its target; exp is x = n ln2 + r,
// |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 6 (~2 ulp), times 2^n.
constexpr float LOG2E = 1.44269504f, LN2_HI = 0.693145752f, LN2_LO = 1.42860677e-6f;

// fn<N> args for N = min(n, 8) heads: the heads' accumulators stay in registers at a count known when compiled.
#define BY_HEADS(n, fn, args)  \
  switch (std::min<int64_t>(n, 8)) { \
    case 1: fn<1> args; break;   \
    case 2: fn<2> args; break;   \
    case 3: fn<3> args; break;   \
    case 4: fn<4> args; break;   \
    case 5: fn<5> args; break;   \
    case 6: fn<6> args; break;   \
    case 7: fn<7> args; break;   \
    default: fn<8> args;         \
  }

struct Scalar {
  template <int N>
  static void scores_n(const float* q, const float* k, int64_t ks, int64_t d, int64_t len, float scale, float* s) {
    for (int64_t j = 0; j < len; ++j) {
      for (int64_t h = 0; h < N; ++h) {
        float t = 0.f;
        for (int64_t i = 0; i < d; ++i) t += q[h * d + i] * k[j * ks + i];
        s[h * len + j] = t * scale;
      }
    }
  }
  template <int N>
  static void values_n(const float* p, const float* v, int64_t vs, int64_t d, int64_t len, float* out) {
    std::fill(out, out + N * d, 0.f);
    for (int64_t j = 0; j < len; ++j) {
      for (int64_t h = 0; h < N; ++h) {
        for (int64_t i = 0; i < d; ++i) out[h * d + i] += p[h * len + j] * v[j * vs + i];
      }
    }
  }
  static void softmax(float* s, int64_t n) {
    const float top = *std::max_element(s, s + n);
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) total += (s[j] = std::exp(s[j] - top));
    for (int64_t j = 0; j < n; ++j) s[j] /= total;
  }
  static void silu_mul(const float* g, const float* u, float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
};

#if defined(__x86_64__)
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define T256 __attribute__((target("avx2,fma")))

// The lanes of a 16-float vector at i that fall before n.
inline __mmask16 lanes(int64_t n, int64_t i) {
  return n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
}

struct Avx512 {
  T512 static __m512 exp(__m512 x) {  // x clamped to [-87, 88]: finite, never a denormal
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    for (float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
  }
  T512 static void silu_mul(const float* g, const float* u, float* y, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = lanes(n, i);
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
      const __m512 e = exp(_mm512_sub_ps(_mm512_setzero_ps(), gv));
      const __mmask16 live = _mm512_cmp_ps_mask(gv, _mm512_set1_ps(-88.f), _CMP_GE_OQ);  // else e^-g overflows: 0
      const __m512 s = _mm512_maskz_div_ps(live, gv, _mm512_add_ps(one, e));
      _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + i)));
    }
  }
  // Up to 8 heads against one key at a time: the key read once, each head's sum in its own register.
  template <int N>
  T512 static void scores_n(const float* q, const float* k, int64_t ks, int64_t d, int64_t len, float scale, float* s) {
    for (int64_t j = 0; j < len; ++j) {
      const float* kj = k + j * ks;
      __m512 acc[N];
      for (int h = 0; h < N; ++h) acc[h] = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 m = lanes(d, i);
        const __m512 kv = _mm512_maskz_loadu_ps(m, kj + i);
        for (int h = 0; h < N; ++h) acc[h] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + h * d + i), kv, acc[h]);
      }
      for (int h = 0; h < N; ++h) s[h * len + j] = _mm512_reduce_add_ps(acc[h]) * scale;
    }
  }
  // Up to 8 heads' weighted sums of the values, 32 columns at a time held in registers over every key.
  template <int N>
  T512 static void values_n(const float* p, const float* v, int64_t vs, int64_t d, int64_t len, float* out) {
    for (int64_t i = 0; i < d; i += 32) {
      const __mmask16 m0 = lanes(d, i), m1 = i + 16 < d ? lanes(d, i + 16) : 0;
      __m512 a0[N], a1[N];
      for (int h = 0; h < N; ++h) a0[h] = a1[h] = _mm512_setzero_ps();
      for (int64_t j = 0; j < len; ++j) {
        const __m512 x0 = _mm512_maskz_loadu_ps(m0, v + j * vs + i), x1 = _mm512_maskz_loadu_ps(m1, v + j * vs + i + 16);
        for (int h = 0; h < N; ++h) {
          const __m512 ph = _mm512_set1_ps(p[h * len + j]);
          a0[h] = _mm512_fmadd_ps(ph, x0, a0[h]);
          a1[h] = _mm512_fmadd_ps(ph, x1, a1[h]);
        }
      }
      for (int h = 0; h < N; ++h) {
        _mm512_mask_storeu_ps(out + h * d + i, m0, a0[h]);
        _mm512_mask_storeu_ps(out + h * d + i + 16, m1, a1[h]);
      }
    }
  }
  T512 static void softmax(float* s, int64_t n) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = lanes(n, j);
      top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, s + j));
    }
    const __m512 t = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = lanes(n, j);
      const __m512 e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), t));
      _mm512_mask_storeu_ps(s + j, m, e);
      total = _mm512_mask_add_ps(total, m, total, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = lanes(n, j);
      _mm512_mask_storeu_ps(s + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), inv));
    }
  }
};

struct Avx2 {
  T256 static __m256 exp(__m256 x) {  // x clamped to [-87, 88]: finite, never a denormal
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    for (float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  }
  T256 static float sum(__m256 v) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
  T256 static void silu_mul(const float* g, const float* u, float* y, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 e = exp(_mm256_sub_ps(_mm256_setzero_ps(), gv));
      const __m256 live = _mm256_cmp_ps(gv, _mm256_set1_ps(-88.f), _CMP_GE_OQ);  // else e^-g overflows: 0
      const __m256 s = _mm256_and_ps(live, _mm256_div_ps(gv, _mm256_add_ps(one, e)));
      _mm256_storeu_ps(y + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    Scalar::silu_mul(g + i, u + i, y + i, n - i);
  }
  // As Avx512's, 8 columns a register; the columns past the last multiple of 8 in scalar code.
  template <int N>
  T256 static void scores_n(const float* q, const float* k, int64_t ks, int64_t d, int64_t len, float scale, float* s) {
    const int64_t whole = d / 8 * 8;
    for (int64_t j = 0; j < len; ++j) {
      const float* kj = k + j * ks;
      __m256 acc[N];
      for (int h = 0; h < N; ++h) acc[h] = _mm256_setzero_ps();
      for (int64_t i = 0; i < whole; i += 8) {
        const __m256 kv = _mm256_loadu_ps(kj + i);
        for (int h = 0; h < N; ++h) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + i), kv, acc[h]);
      }
      for (int h = 0; h < N; ++h) {
        float t = sum(acc[h]);
        for (int64_t i = whole; i < d; ++i) t += q[h * d + i] * kj[i];
        s[h * len + j] = t * scale;
      }
    }
  }
  template <int N>
  T256 static void values_n(const float* p, const float* v, int64_t vs, int64_t d, int64_t len, float* out) {
    const int64_t whole = d / 8 * 8;
    for (int64_t i = 0; i < whole; i += 8) {
      __m256 a[N];
      for (int h = 0; h < N; ++h) a[h] = _mm256_setzero_ps();
      for (int64_t j = 0; j < len; ++j) {
        const __m256 x = _mm256_loadu_ps(v + j * vs + i);
        for (int h = 0; h < N; ++h) a[h] = _mm256_fmadd_ps(_mm256_set1_ps(p[h * len + j]), x, a[h]);
      }
      for (int h = 0; h < N; ++h) _mm256_storeu_ps(out + h * d + i, a[h]);
    }
    for (int h = 0; h < N; ++h) {
      for (int64_t i = whole; i < d; ++i) {
        float t = 0.f;
        for (int64_t j = 0; j < len; ++j) t += p[h * len + j] * v[j * vs + i];
        out[h * d + i] = t;
      }
    }
  }
  T256 static void softmax(float* s, int64_t n) {
    const float top = *std::max_element(s, s + n);
    const __m256 t = _mm256_set1_ps(top);
    __m256 total = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp(_mm256_sub_ps(_mm256_loadu_ps(s + j), t));
      _mm256_storeu_ps(s + j, e);
      total = _mm256_add_ps(total, e);
    }
    float rest = sum(total);
    for (; j < n; ++j) rest += (s[j] = std::exp(s[j] - top));
    const float inv = 1.f / rest;
    for (j = 0; j < n; ++j) s[j] *= inv;
  }
};
#else
#define T512
#define T256
using Avx512 = Scalar;  // no vector paths off x86: every ISA name runs the scalar one
using Avx2 = Scalar;
#endif

// One row's KV head: g query heads (q, g x d) against keys and values k[j], v[j] (row stride `ks`, `vs`)
// for j < len; out (g x d). `scores` has room for g x len.
template <class Ops>
void attend_group(const float* q, const float* k, const float* v, int64_t ks, int64_t vs, int64_t g, int64_t d,
                  int64_t len, float scale, float* scores, float* out) {
  for (int64_t h = 0; h < g; h += 8) {
    BY_HEADS(g - h, Ops::template scores_n, (q + h * d, k, ks, d, len, scale, scores + h * len));
  }
  for (int64_t h = 0; h < g; ++h) Ops::softmax(scores + h * len, len);
  for (int64_t h = 0; h < g; h += 8) {
    BY_HEADS(g - h, Ops::template values_n, (scores + h * len, v, vs, d, len, out + h * d));
  }
}

// One head's rotary embedding, rotate-half layout: y = x * c + roll(x, d / 2) * s (s signed, as the tables).
inline __attribute__((always_inline)) void rope_head(const float* x, const float* c, const float* s, int64_t d,
                                                     float* y) {
  const int64_t half = d / 2;
  float* t = y;  // x * c rounded, then the rotated product fused in: torch's addcmul's arithmetic, the same bits
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) t[i] = x[i] * c[i];
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) y[i] = std::fma(x[i + half], s[i], t[i]);
#pragma omp simd
  for (int64_t i = half; i < d; ++i) y[i] = std::fma(x[i - half], s[i], t[i]);
}

// Each function below is built for AVX-512, AVX2 and the compiler's default target; `fast` picks one.
#define THREE_WAYS(name, params, args)                                  \
  T512 __attribute__((noinline)) void name##_512 params { name args; } \
  T256 __attribute__((noinline)) void name##_256 params { name args; } \
  __attribute__((noinline)) void name##_any params { name args; }

THREE_WAYS(norm_row, (const float* x, const float* w, float eps, int64_t d, float* y), (x, w, eps, d, y))
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
THREE_WAYS(rope_head, (const float* x, const float* c, const float* s, int64_t d, float* y), (x, c, s, d, y))
#pragma GCC pop_options
THREE_WAYS(add_norm_row, (const float* a, const float* b, const float* w, float eps, int64_t d, float* s, float* y),
           (a, b, w, eps, d, s, y))

// The instruction set a call runs with, named as the matmul's (`nlg::isas`): "avx512vnni" takes the
// AVX-512 functions (they need AVX-512 F, BW and VL only), "avx2" and "avxvnni" the AVX2 ones.
int width(const std::string& isa) {
  if (isa == "avx512vnni") return 2;
  if (isa == "avx2" || isa == "avxvnni") return 1;
  TORCH_CHECK(isa == "portable", "isa: avx512vnni, avxvnni, avx2 or portable, not ", isa);
  return 0;
}

template <class F512, class F256, class Fany>
auto fast(const std::string& isa, F512 a, F256 b, Fany c) {
  const int w = width(isa);
  return w == 2 ? a : w == 1 ? b : c;
}

void check_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm: fp32 only");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0), "rms_norm: x (..., d), weight (d)");
}

constexpr int64_t ROWS_PER_TASK = 16;  // rows one thread takes at least (a decode batch stays on one)

}  // namespace

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps, const std::string& isa) {
  check_rows(x_in, w_in);
  const auto x = x_in.contiguous(), w = w_in.contiguous();
  auto y = at::empty_like(x);
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto row = fast(isa, norm_row_512, norm_row_256, norm_row_any);
  at::parallel_for(0, rows, ROWS_PER_TASK, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row(xp + r * d, wp, static_cast<float>(eps), d, yp + r * d);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& res_in,
                                                const at::Tensor& w_in, double eps, const std::string& isa) {
  check_rows(x_in, w_in);
  TORCH_CHECK(res_in.sizes() == x_in.sizes() && res_in.scalar_type() == at::kFloat, "add_rms_norm: residual as x");
  const auto x = x_in.contiguous(), res = res_in.contiguous(), w = w_in.contiguous();
  auto y = at::empty_like(x), s = at::empty_like(x);
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  const float *xp = x.data_ptr<float>(), *rp = res.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *sp = s.data_ptr<float>();
  const auto row = fast(isa, add_norm_row_512, add_norm_row_256, add_norm_row_any);
  at::parallel_for(0, rows, ROWS_PER_TASK, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      row(xp + r * d, rp + r * d, wp, static_cast<float>(eps), d, sp + r * d, yp + r * d);
    }
  });
  return {y, s};
}

// q (B, T, Hkv, G, D): row b's T query tokens, their heads grouped by the KV head they read; k, v (B, Hkv, S,
// D) any strides but the last; lengths (B, T) int64: query t of row b attends to keys 0..lengths[b, t]-1.
// Returns (B, T, Hkv, G, D). Each (row, query, KV head) is computed alone, the same way at any T: a decode
// step and a verify step of speculation give a query the same bits.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& lengths_in, double scale, const std::string& isa) {
  TORCH_CHECK(q_in.dim() == 5 && k.dim() == 4 && v.dim() == 4, "decode_attention: q 5-d, k, v 4-d");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: fp32 only");
  const int64_t b = q_in.size(0), t = q_in.size(1), hkv = q_in.size(2), g = q_in.size(3), d = q_in.size(4);
  const int64_t span = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(1) == hkv && k.size(3) == d && v.sizes() == k.sizes(),
              "decode_attention: k, v (B, Hkv, S, D) as q");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: keys and values contiguous per position");
  const auto q = q_in.contiguous();
  const auto lengths = lengths_in.to(at::kLong).contiguous();
  TORCH_CHECK(lengths.numel() == b * t, "decode_attention: one length per query (B, T)");
  const int64_t* lp = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < b * t; ++i) {
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= span, "decode_attention: length ", lp[i], " out of range 1..", span);
  }
  auto out = at::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto group = fast(isa, attend_group<Avx512>, attend_group<Avx2>, attend_group<Scalar>);
  at::parallel_for(0, b * t * hkv, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> scores(g * span);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t query = u / hkv, row = query / t, head = u % hkv;
      group(qp + u * g * d, kp + row * k.stride(0) + head * k.stride(1), vp + row * v.stride(0) + head * v.stride(1),
            k.stride(2), v.stride(2), g, d, lp[query], static_cast<float>(scale), scores.data(), op + u * g * d);
    }
  });
  return out;
}

// x (B, T, H, D), any strides but the last (q and k heads of the qkv projection's output); cos, sin (B, T, D)
// the rows of the tables at each token's position -> rotated (B, T, H, D), contiguous.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in, const std::string& isa) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "rope: x (B, T, H, D) fp32, D even and contiguous");
  const int64_t b = x.size(0), t = x.size(1), h = x.size(2), d = x.size(3);
  const auto c = cos_in.to(at::kFloat).contiguous(), s = sin_in.to(at::kFloat).contiguous();
  TORCH_CHECK(c.numel() == b * t * d && s.numel() == b * t * d, "rope: cos, sin (B, T, D)");
  auto y = at::empty({b, t, h, d}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto head = fast(isa, rope_head_512, rope_head_256, rope_head_any);
  at::parallel_for(0, b * t, ROWS_PER_TASK, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + (r / t) * x.stride(0) + (r % t) * x.stride(1);
      for (int64_t j = 0; j < h; ++j) head(xr + j * x.stride(2), cp + r * d, sp + r * d, d, yp + (r * h + j) * d);
    }
  });
  return y;
}

// x (..., 2n): gate then up, as the merged projection gives them -> silu(gate) * up (..., n).
at::Tensor silu_mul(const at::Tensor& x_in, const std::string& isa) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() >= 1 && x_in.size(-1) % 2 == 0,
              "silu_mul: fp32 (..., 2n)");
  const auto x = x_in.contiguous();
  const int64_t n = x.size(-1) / 2, rows = x.numel() / std::max<int64_t>(2 * n, 1);
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto y = at::empty(sizes, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto row = fast(isa, Avx512::silu_mul, Avx2::silu_mul, Scalar::silu_mul);
  at::parallel_for(0, rows, ROWS_PER_TASK, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row(xp + r * 2 * n, xp + r * 2 * n + n, yp + r * n, n);
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(nlg, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, str isa) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, str isa) -> (Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale, str isa) -> Tensor");
  m.def("silu_mul(Tensor x, str isa) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, str isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(nlg, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("decode_attention", &decode_attention);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope", &rope);
}
