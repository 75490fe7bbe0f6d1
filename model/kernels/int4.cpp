// Int4 weights x int8 activations on a CPU: the matmul of parallel.quant.Int4Linear (ops nlg::*).
//
// Weight form: a row is cut into blocks of 32 input columns, each with 32 levels 0..15, a scale s and a
// low m (w = level * s + m: Q4_1's form, which Q4_0 and Q4_K's sub-blocks take without loss).
//
// Packed layout, made once at load (`pack_int4`): output rows in tiles of 16 (the last one padded with
// zero rows); for each tile, block after block, 320 bytes: 256 bytes of levels, then the 16 rows' scales
// and the 16 rows' lows as fp16. The levels come as four 64-byte chunks; in chunk j, bytes 4r..4r+3 hold
// row r's columns 4j..4j+3 in their low nibbles and columns 16+4j..16+4j+3 in their high nibbles. So one
// 64-byte load and a mask give a register whose 32-bit lane r holds four levels of row r: one AVX-512
// VNNI `dpbusd` against four activation bytes broadcast to every lane adds four products for 16 rows at
// once, and the sums of the 16 rows stay in their lanes (no horizontal reduction anywhere). A tile's
// blocks are contiguous, so a thread streams its weights in one sequential read.
//
// Activations are quantized per row and block of 32 to int8 (q, x ~ q * d, as llama.cpp's Q8_0). Then
//   sum(w * x) over a block = s * d * sum(level * q) + m * d * sum(q),
// the first sum in integer registers, the scales applied in fp32 once per block. Levels are unsigned and
// at most 15, so AVX2's `maddubs` (u8 x s8 pairs into int16) can add eight pairs of products per lane
// before widening without saturating: 8 * 2 * 15 * 127 = 30480 < 32767.
//
// Work is split over torch's threads by tiles of output rows. Each weight tile is read once for up to
// ROWS_PER_PASS activation rows (their accumulators stay in registers), and activation rows go in
// chunks of ROW_CHUNK so a chunk's int8 rows stay in cache while a thread walks its tiles.
//
// The instruction set is picked at run time (GCC's target attributes, `__builtin_cpu_supports`):
// AVX-512 VNNI, else AVX2 + FMA + F16C, else portable C++ (what an ARM laptop gets, autovectorized).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 32;       // input columns per scale
constexpr int64_t TILE = 16;        // output rows per tile
constexpr int64_t LEVEL_BYTES = 256;  // one tile's levels of one block
constexpr int64_t TILE_BLOCK = LEVEL_BYTES + 2 * TILE * 2;  // + fp16 scales and lows: 320 bytes
constexpr int ROWS_PER_PASS = 8;    // activation rows per pass over a weight tile
constexpr int64_t ROW_CHUNK = 64;   // activation rows kept in cache while a thread walks its tiles

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

// One row of activations: q (K int8), and per block d and d * sum(q).
struct Quantized {
  const int8_t* q;
  const float* d;
  const float* dsum;
};

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = 113;
    uint32_t m = man;
    while (!(m & 0x400)) {
      m <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((m & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

void quantize_row(const float* x, int64_t k, int8_t* q, float* d, float* dsum) {
  for (int64_t b = 0; b < k / BLOCK; ++b) {
    const float* xb = x + b * BLOCK;
    float amax = 0.f;
    for (int i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int i = 0; i < BLOCK; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
      q[b * BLOCK + i] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = scale;
    dsum[b] = scale * static_cast<float>(sum);
  }
}

// One tile, `rows` activation rows (1..ROWS_PER_PASS), portable C++.
void tile_portable(const uint8_t* w, int64_t nb, const Quantized* a, int rows, float* y, int64_t ystride, int valid) {
  float acc[ROWS_PER_PASS][TILE] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * TILE_BLOCK;
    const uint16_t* sm = reinterpret_cast<const uint16_t*>(wb + LEVEL_BYTES);
    for (int r = 0; r < rows; ++r) {
      const int8_t* qb = a[r].q + b * BLOCK;
      for (int o = 0; o < TILE; ++o) {
        int sum = 0;
        for (int j = 0; j < 4; ++j) {
          for (int p = 0; p < 4; ++p) {
            const uint8_t byte = wb[64 * j + 4 * o + p];
            sum += (byte & 0x0F) * qb[4 * j + p] + (byte >> 4) * qb[16 + 4 * j + p];
          }
        }
        acc[r][o] += half_to_float(sm[o]) * a[r].d[b] * static_cast<float>(sum) +
                     half_to_float(sm[TILE + o]) * a[r].dsum[b];
      }
    }
  }
  for (int r = 0; r < rows; ++r) std::memcpy(y + r * ystride, acc[r], valid * sizeof(float));
}

#if defined(__x86_64__)

AVX2 inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Rows 0-7 of a tile are bytes 0..31 of each 64-byte chunk, rows 8-15 bytes 32..63: two 8-lane halves.
template <int R>
AVX2 void tile_avx2(const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * TILE_BLOCK;
    for (int h = 0; h < 2; ++h) {
      __m256i lo[4], hi[4];
      for (int j = 0; j < 4; ++j) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j + 32 * h));
        lo[j] = _mm256_and_si256(c, mask);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(c, 4), mask);
      }
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + LEVEL_BYTES + 16 * h)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + LEVEL_BYTES + 32 + 16 * h)));
      for (int r = 0; r < R; ++r) {
        const int8_t* qb = a[r].q + b * BLOCK;
        __m256i p = _mm256_maddubs_epi16(lo[0], bcast4(qb));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo[1], bcast4(qb + 4)));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo[2], bcast4(qb + 8)));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo[3], bcast4(qb + 12)));
        __m256i p2 = _mm256_maddubs_epi16(hi[0], bcast4(qb + 16));
        p2 = _mm256_add_epi16(p2, _mm256_maddubs_epi16(hi[1], bcast4(qb + 20)));
        p2 = _mm256_add_epi16(p2, _mm256_maddubs_epi16(hi[2], bcast4(qb + 24)));
        p2 = _mm256_add_epi16(p2, _mm256_maddubs_epi16(hi[3], bcast4(qb + 28)));
        const __m256i sums = _mm256_madd_epi16(_mm256_add_epi16(p, p2), ones);
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(s, _mm256_set1_ps(a[r].d[b])), acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(a[r].dsum[b]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float out[TILE];
    _mm256_store_ps(out, acc[r][0]);
    _mm256_store_ps(out + 8, acc[r][1]);
    std::memcpy(y + r * ystride, out, valid * sizeof(float));
  }
}

VNNI inline __m512i bcast4_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int R>
VNNI void tile_vnni(const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * TILE_BLOCK;
    _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * TILE_BLOCK), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * TILE_BLOCK + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * TILE_BLOCK + 128), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * TILE_BLOCK + 192), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * TILE_BLOCK + 256), _MM_HINT_T0);
    __m512i lo[4], hi[4];
    for (int j = 0; j < 4; ++j) {
      const __m512i c = _mm512_loadu_si512(wb + 64 * j);
      lo[j] = _mm512_and_si512(c, mask);
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(c, 4), mask);
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + LEVEL_BYTES)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + LEVEL_BYTES + 32)));
    for (int r = 0; r < R; ++r) {
      const int8_t* qb = a[r].q + b * BLOCK;
      __m512i i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], bcast4_512(qb));
      __m512i i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[0], bcast4_512(qb + 16));
      i0 = _mm512_dpbusd_epi32(i0, lo[1], bcast4_512(qb + 4));
      i1 = _mm512_dpbusd_epi32(i1, hi[1], bcast4_512(qb + 20));
      i0 = _mm512_dpbusd_epi32(i0, lo[2], bcast4_512(qb + 8));
      i1 = _mm512_dpbusd_epi32(i1, hi[2], bcast4_512(qb + 24));
      i0 = _mm512_dpbusd_epi32(i0, lo[3], bcast4_512(qb + 12));
      i1 = _mm512_dpbusd_epi32(i1, hi[3], bcast4_512(qb + 28));
      const __m512 sums = _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1));
      acc[r] = _mm512_fmadd_ps(sums, _mm512_mul_ps(s, _mm512_set1_ps(a[r].d[b])), acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(a[r].dsum[b]), acc[r]);
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ystride, keep, acc[r]);
}

#endif

enum class Isa { portable, avx2, avx512vnni };

Isa parse(const std::string& isa) {
  if (isa == "avx512vnni") return Isa::avx512vnni;
  if (isa == "avx2") return Isa::avx2;
  TORCH_CHECK(isa == "portable", "isa: avx512vnni, avx2 or portable, not ", isa);
  return Isa::portable;
}

template <int R>
void tile_rows(Isa isa, const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
#if defined(__x86_64__)
  if (isa == Isa::avx512vnni) return tile_vnni<R>(w, nb, a, y, ystride, valid);
  if (isa == Isa::avx2) return tile_avx2<R>(w, nb, a, y, ystride, valid);
#endif
  tile_portable(w, nb, a, R, y, ystride, valid);
}

void tile(Isa isa, const uint8_t* w, int64_t nb, const Quantized* a, int rows, float* y, int64_t ystride, int valid) {
  switch (rows) {
    case 1: return tile_rows<1>(isa, w, nb, a, y, ystride, valid);
    case 2: return tile_rows<2>(isa, w, nb, a, y, ystride, valid);
    case 3: return tile_rows<3>(isa, w, nb, a, y, ystride, valid);
    case 4: return tile_rows<4>(isa, w, nb, a, y, ystride, valid);
    case 5: return tile_rows<5>(isa, w, nb, a, y, ystride, valid);
    case 6: return tile_rows<6>(isa, w, nb, a, y, ystride, valid);
    case 7: return tile_rows<7>(isa, w, nb, a, y, ystride, valid);
    default: return tile_rows<8>(isa, w, nb, a, y, ystride, valid);
  }
}

uint16_t float_to_half(float f) {
  return c10::Half(f).x;
}

}  // namespace

// The best instruction set this CPU runs: "avx512vnni", "avx2" or "portable".
std::string best_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c")) {
    return "avx512vnni";
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return "avx2";
#endif
  return "portable";
}

// levels (N, K) uint8 0..15, scale and low (N, K / 32) fp32 -> the packed layout, (ceil(N / 16), K / 32, 320).
at::Tensor pack_int4(const at::Tensor& levels, const at::Tensor& scale, const at::Tensor& low) {
  TORCH_CHECK(levels.dim() == 2 && levels.scalar_type() == at::kByte, "levels: (N, K) uint8");
  const int64_t n = levels.size(0), k = levels.size(1), nb = k / BLOCK, tiles = (n + TILE - 1) / TILE;
  TORCH_CHECK(k % BLOCK == 0, "K must be a multiple of 32, not ", k);
  TORCH_CHECK(scale.sizes() == low.sizes() && scale.size(0) == n && scale.size(1) == nb, "scale, low: (N, K / 32)");
  const auto l = levels.contiguous();
  const auto s = scale.to(at::kFloat).contiguous(), m = low.to(at::kFloat).contiguous();
  TORCH_CHECK(s.abs().max().item<float>() < 65504.f && m.abs().max().item<float>() < 65504.f,
              "scales and lows must fit fp16");
  auto packed = at::zeros({tiles, nb, TILE_BLOCK}, at::kByte);
  const uint8_t* lp = l.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* wb = out + (t * nb + b) * TILE_BLOCK;
        uint16_t* sm = reinterpret_cast<uint16_t*>(wb + LEVEL_BYTES);
        for (int64_t o = 0; o < TILE && t * TILE + o < n; ++o) {
          const int64_t row = t * TILE + o;
          const uint8_t* lb = lp + row * k + b * BLOCK;
          for (int j = 0; j < 4; ++j) {
            for (int p = 0; p < 4; ++p) {
              wb[64 * j + 4 * o + p] = static_cast<uint8_t>((lb[4 * j + p] & 0x0F) | ((lb[16 + 4 * j + p] & 0x0F) << 4));
            }
          }
          sm[o] = float_to_half(sp[row * nb + b]);
          sm[TILE + o] = float_to_half(mp[row * nb + b]);
        }
      }
    }
  });
  return packed;
}

// x (M, K) fp32 @ W.T for W (n, K) in the packed layout -> (M, n) fp32.
at::Tensor int4_mm(const at::Tensor& x_in, const at::Tensor& packed, int64_t n, const std::string& isa_name) {
  TORCH_CHECK(x_in.dim() == 2, "x: (M, K)");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == TILE_BLOCK, "packed layout");
  const Isa isa = parse(isa_name);
  const auto x = x_in.to(at::kFloat).contiguous();
  const int64_t rows = x.size(0), k = x.size(1), nb = k / BLOCK, tiles = packed.size(0);
  TORCH_CHECK(packed.size(1) == nb && k % BLOCK == 0, "x has ", k, " columns; the weight ", packed.size(1) * BLOCK);
  TORCH_CHECK(n > (tiles - 1) * TILE && n <= tiles * TILE, "n does not match the packed tiles");
  auto q = at::empty({rows, k}, at::kChar);
  auto scales = at::empty({rows, 2, nb}, at::kFloat);
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* dp = scales.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_row(xp + r * k, k, qp + r * k, dp + r * 2 * nb, dp + r * 2 * nb + nb);
  });
  auto y = at::empty({rows, n}, at::kFloat);
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    Quantized a[ROWS_PER_PASS];
    for (int64_t c = 0; c < rows; c += ROW_CHUNK) {
      const int64_t c1 = std::min(rows, c + ROW_CHUNK);
      for (int64_t t = t0; t < t1; ++t) {
        const int valid = static_cast<int>(std::min<int64_t>(TILE, n - t * TILE));
        for (int64_t r = c; r < c1; r += ROWS_PER_PASS) {
          const int count = static_cast<int>(std::min<int64_t>(ROWS_PER_PASS, c1 - r));
          for (int i = 0; i < count; ++i) {
            a[i] = {qp + (r + i) * k, dp + (r + i) * 2 * nb, dp + (r + i) * 2 * nb + nb};
          }
          tile(isa, wp + t * nb * TILE_BLOCK, nb, a, count, yp + r * n + t * TILE, n, valid);
        }
      }
    }
  });
  return y;
}

TORCH_LIBRARY(nlg, m) {
  m.def("best_isa() -> str", &best_isa);
  m.def("pack_int4(Tensor levels, Tensor scale, Tensor low) -> Tensor", &pack_int4);
  m.def("int4_mm(Tensor x, Tensor packed, int n, str isa) -> Tensor", &int4_mm);
}
