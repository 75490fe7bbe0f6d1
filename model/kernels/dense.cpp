// fp32 weights x fp32 activations (ops nlg::pack_dense, nlg::dense): the linear layers of unquantized models.
//
// Packed layout, made once at load (`pack_dense`): output rows in tiles of 16 (the last one padded with zero
// rows), each tile column after column, (ceil(N / 16), K, 16) floats: one 64-byte line holds one input
// column's weights for the tile's 16 outputs. A tile is thus one stream in memory order, its lines asked
// into L2 PREFETCH bytes ahead as the quantized kernels do (`matmul.cpp`), and one AVX-512 register (two
// AVX2 ones) of weights times one activation broadcast to every lane adds a product to 16 outputs at once:
// each output's sum stays in its lane, no horizontal reduction anywhere. Up to ROWS activation rows share
// each weight load; with fewer than 4 rows each row's sum is split over columns into several registers, so
// that the adds do not wait on one another.
//
// Work is split over torch's threads by tiles. Activation rows go in chunks small enough to stay in L2
// while a thread walks its tiles (prefill), each tile read once per chunk.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TILE = 16;                // output rows per tile (lanes of an AVX-512 register)
constexpr int ROWS = 8;                     // activation rows a pass over a tile
constexpr int64_t PREFETCH = 6144;          // bytes ahead of the weight stream asked into L2
constexpr int64_t CHUNK_BYTES = 4 << 20;    // activation rows a chunk, at most

// Accumulator registers per activation row: 4 chains of adds for one row, 2 for two, one from four on.
constexpr int chains(int rows) { return rows == 1 ? 4 : rows == 2 ? 2 : 1; }

// y (R rows, ystride apart; `valid` of the tile's 16 outputs) = x (R rows of k, xstride apart) @ tile.T.
template <int R>
void tile_portable(const float* w, int64_t k, const float* x, int64_t xstride, float* y, int64_t ystride,
                   int valid) {
  float acc[R][TILE] = {};
  for (int64_t i = 0; i < k; ++i) {
    for (int r = 0; r < R; ++r) {
      const float v = x[r * xstride + i];
      for (int o = 0; o < TILE; ++o) acc[r][o] += w[i * TILE + o] * v;
    }
  }
  for (int r = 0; r < R; ++r) std::copy(acc[r], acc[r] + valid, y + r * ystride);
}

#if defined(__x86_64__)

#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f,avx2,fma")))

template <int R>
AVX512 void tile_avx512(const float* w, int64_t k, const float* x, int64_t xstride, float* y, int64_t ystride,
                        int valid) {
  constexpr int S = chains(R);
  __m512 acc[R][S];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) acc[r][s] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + S <= k; i += S) {
    for (int s = 0; s < S; ++s) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (i + s) * TILE) + PREFETCH, _MM_HINT_T1);
      const __m512 wv = _mm512_loadu_ps(w + (i + s) * TILE);
      for (int r = 0; r < R; ++r) acc[r][s] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[r * xstride + i + s]), acc[r][s]);
    }
  }
  for (; i < k; ++i) {
    const __m512 wv = _mm512_loadu_ps(w + i * TILE);
    for (int r = 0; r < R; ++r) acc[r][0] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[r * xstride + i]), acc[r][0]);
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
  for (int r = 0; r < R; ++r) {
    for (int s = 1; s < S; ++s) acc[r][0] = _mm512_add_ps(acc[r][0], acc[r][s]);
    _mm512_mask_storeu_ps(y + r * ystride, keep, acc[r][0]);
  }
}

// AVX2: a tile's column is two registers (lo, hi); 16 of them hold at most 6 rows' sums beside the weights.
template <int R>
AVX2 void tile_avx2(const float* w, int64_t k, const float* x, int64_t xstride, float* y, int64_t ystride,
                    int valid) {
  constexpr int S = R == 1 ? 2 : 1;
  __m256 acc[2 * R * S];  // row r's chain s: outputs 0..7 at 2 * (r * S + s), 8..15 after them
  for (int j = 0; j < 2 * R * S; ++j) acc[j] = _mm256_setzero_ps();
  const int64_t steps = k / S;
  for (int64_t step = 0; step < steps; ++step) {
    for (int s = 0; s < S; ++s) {
      const int64_t i = step * S + s;
      _mm_prefetch(reinterpret_cast<const char*>(w + i * TILE) + PREFETCH, _MM_HINT_T1);
      const __m256 w0 = _mm256_loadu_ps(w + i * TILE), w1 = _mm256_loadu_ps(w + i * TILE + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 v = _mm256_set1_ps(x[r * xstride + i]);
        acc[2 * (r * S + s)] = _mm256_fmadd_ps(w0, v, acc[2 * (r * S + s)]);
        acc[2 * (r * S + s) + 1] = _mm256_fmadd_ps(w1, v, acc[2 * (r * S + s) + 1]);
      }
    }
  }
  if (S > 1 && k % S) {  // the column left over: only one row has two chains
    const __m256 v = _mm256_set1_ps(x[k - 1]);
    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w + (k - 1) * TILE), v, acc[0]);
    acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(w + (k - 1) * TILE + 8), v, acc[1]);
  }
  for (int r = 0; r < R; ++r) {
    __m256 lo = acc[2 * r * S], hi = acc[2 * r * S + 1];
    for (int s = 1; s < S; ++s) {
      lo = _mm256_add_ps(lo, acc[2 * (r * S + s)]);
      hi = _mm256_add_ps(hi, acc[2 * (r * S + s) + 1]);
    }
    alignas(32) float out[TILE];
    _mm256_store_ps(out, lo);
    _mm256_store_ps(out + 8, hi);
    std::copy(out, out + valid, y + r * ystride);
  }
}

#endif

enum class Isa { portable, avx2, avx512 };

Isa parse(const std::string& isa) {
  if (isa == "avx512vnni") return Isa::avx512;  // the names of `nlg::isas`: AVX-512 F is what this file uses
  if (isa == "avx2" || isa == "avxvnni") return Isa::avx2;
  TORCH_CHECK(isa == "portable", "isa: avx512vnni, avxvnni, avx2 or portable, not ", isa);
  return Isa::portable;
}

// Up to the ISA's rows per pass (`ROWS`; AVX2 6) of one tile.
template <int R>
void tile_rows(Isa isa, const float* w, int64_t k, const float* x, int64_t xstride, float* y, int64_t ystride,
               int valid) {
#if defined(__x86_64__)
  if (isa == Isa::avx512) return tile_avx512<R>(w, k, x, xstride, y, ystride, valid);
  if (isa == Isa::avx2) return tile_avx2<R>(w, k, x, xstride, y, ystride, valid);
#endif
  tile_portable<R>(w, k, x, xstride, y, ystride, valid);
}

void tile(Isa isa, const float* w, int64_t k, const float* x, int64_t xstride, int rows, float* y,
          int64_t ystride, int valid) {
  switch (rows) {
    case 1: return tile_rows<1>(isa, w, k, x, xstride, y, ystride, valid);
    case 2: return tile_rows<2>(isa, w, k, x, xstride, y, ystride, valid);
    case 3: return tile_rows<3>(isa, w, k, x, xstride, y, ystride, valid);
    case 4: return tile_rows<4>(isa, w, k, x, xstride, y, ystride, valid);
    case 5: return tile_rows<5>(isa, w, k, x, xstride, y, ystride, valid);
    case 6: return tile_rows<6>(isa, w, k, x, xstride, y, ystride, valid);
    case 7: return tile_rows<7>(isa, w, k, x, xstride, y, ystride, valid);
    default: return tile_rows<ROWS>(isa, w, k, x, xstride, y, ystride, valid);
  }
}

}  // namespace

// w (N, K) fp32 -> the packed layout, (ceil(N / 16), K, 16) fp32.
at::Tensor pack_dense(const at::Tensor& w_in) {
  TORCH_CHECK(w_in.dim() == 2, "w: (N, K)");
  const auto w = w_in.to(at::kFloat).contiguous();
  const int64_t n = w.size(0), k = w.size(1), tiles = (n + TILE - 1) / TILE;
  at::Tensor packed = at::zeros({tiles, k, TILE}, at::kFloat);
  const float* wp = w.data_ptr<float>();
  float* out = packed.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t o = 0; o < TILE && t * TILE + o < n; ++o) {
        const float* row = wp + (t * TILE + o) * k;
        for (int64_t i = 0; i < k; ++i) out[(t * k + i) * TILE + o] = row[i];
      }
    }
  });
  return packed;
}

// x (M, K) @ W.T for W (n, K) packed by `pack_dense` -> (M, n) fp32.
at::Tensor dense(const at::Tensor& x_in, const at::Tensor& packed, int64_t n, const std::string& isa_name) {
  TORCH_CHECK(x_in.dim() == 2, "x: (M, K)");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == TILE && packed.scalar_type() == at::kFloat,
              "packed: (tiles, K, 16) fp32");
  const Isa isa = parse(isa_name);
  const auto x = x_in.to(at::kFloat).contiguous();
  const int64_t m = x.size(0), k = x.size(1), tiles = packed.size(0);
  TORCH_CHECK(packed.size(1) == k, "x has ", k, " columns; the weight ", packed.size(1));
  TORCH_CHECK(n > (tiles - 1) * TILE && n <= tiles * TILE, "n does not match the packed tiles");
  auto y = at::empty({m, n}, at::kFloat);
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int per_pass = isa == Isa::avx2 ? 6 : ROWS;
  const int64_t chunk = std::max<int64_t>(per_pass, CHUNK_BYTES / (4 * k));
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t c = 0; c < m; c += chunk) {
      const int64_t c1 = std::min(m, c + chunk);
      for (int64_t t = t0; t < t1; ++t) {
        const int valid = static_cast<int>(std::min<int64_t>(TILE, n - t * TILE));
        for (int64_t r = c; r < c1; r += per_pass) {
          const int rows = static_cast<int>(std::min<int64_t>(per_pass, c1 - r));
          tile(isa, wp + t * k * TILE, k, xp + r * k, k, rows, yp + r * n + t * TILE, n, valid);
        }
      }
    }
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(nlg, m) {
  m.def("pack_dense(Tensor w) -> Tensor");
  m.def("dense(Tensor x, Tensor packed, int n, str isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(nlg, CPU, m) {
  m.impl("pack_dense", &pack_dense);
  m.impl("dense", &dense);
}
