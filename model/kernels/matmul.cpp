// Quantized weights x int8 activations on a CPU: the matmuls of parallel.quant's int4 and int6 layers
// (ops nlg::*).
//
// Three weight forms, all w = level * scale + low per group of columns:
//   int4: levels 0..15, one scale and low per 32 columns (Q4_0, Q4_1 and Q4_K's sub-blocks, without loss);
//   int6: levels 0..63, one scale and low per 16 columns (Q6_K, and Q5_0, Q5_1, Q5_K, without loss);
//   int8: levels -128..127, one fp16 scale per 32 columns and no low (Q8_0, as stored or as `--quantize int8`
//     makes it);
// and int4 and int6 as GGUF's K-quants store them (`pack_sub`, Sub below): int6 as Q6_K (scale = d * sc, an int8
// sc per 16 columns and a factor d per 256, low = -32 * scale; 6.6 bits a weight against 8), int4 as Q4_K
// (scale = d * sc, low = f * mn, 8-bit codes per 32 columns and fp16 factors per 256; 4.625 bits against 5).
//
// Packed layout, made once at load (`pack`): output rows in tiles of 16 (the last one padded with zero
// rows); for each tile, block of 32 columns after block, contiguous so a thread streams its weights:
//   256 bytes: the levels' low 4 bits in four 64-byte chunks. In chunk j, bytes 4r..4r+3 hold row r's
//     columns 4j..4j+3 in their low nibbles and columns 16+4j..16+4j+3 in their high nibbles, so one load
//     and a mask give a register whose 32-bit lane r holds four levels of row r: one AVX-512 VNNI
//     `dpbusd` against four activation bytes broadcast to every lane adds four products for 16 rows at
//     once, and each row's sum stays in its lane (no horizontal reduction anywhere);
//   int6 only, 128 bytes: the levels' top 2 bits, in two 64-byte chunks laid out as the nibble chunks:
//     chunk c, bits 2f..2f+1 of byte 4r+p: the level whose low bits are in nibble register 4c+f (0-3 the
//     four low-nibble registers, i.e. columns 0..15; 4-7 the high-nibble ones, columns 16..31);
//   fp16 scales then fp16 lows of the 16 rows: int4 16 + 16, int6 2 x 16 + 2 x 16 (columns 0..15, 16..31).
// int8 (`Eight`) puts a tile's levels first, every block's 512 bytes (8 chunks of 64: bytes 4r..4r+3 of chunk j
// row r's columns 4j..4j+3), then every block's 16 fp16 scales, so each load of levels is one whole cache line.
//
// Activations are quantized per row and block of 32 to int8 (q, x ~ q * d, as llama.cpp's Q8_0), for the
// K-quants' layouts with one d per 256 columns (as llama.cpp's Q8_K; finer for a block that allows it: FINER).
// Then
//   sum(w * x) over a group = s * d * sum(level * q) + m * d * sum(q),
// the first sum in integer registers, the scales applied in fp32 once per group (for the K-quants' layouts
// on AVX-512 with two or more rows, in int32 from their 8-bit codes, then in fp32 once per 256 columns:
// `tile_super_vnni`). int4's and int6's levels are unsigned, so AVX2's `maddubs` (u8 x s8 pairs into int16)
// needs no sign trick, and int4's eight pairs of products per lane add in int16 before widening without
// saturating (8 * 2 * 15 * 127 = 30480 < 32767; int6 adds two). int8's are signed: AVX2 takes the sign trick,
// the VNNI kernels flip them to level + 128 and start each block's sum at -128 * sum(q).
//
// Work is split over torch's threads by tiles of output rows. Each weight tile is read once for up to
// ROWS_PER_PASS activation rows (their accumulators stay in registers), and activation rows go in
// chunks of ROW_CHUNK so a chunk's int8 rows stay in cache while a thread walks its tiles. The general int4
// layout with more than ROWS_PER_PASS rows (prefill) on AVX-512 VNNI takes tiles two at a time (PAIR_ROWS rows a
// pass), so that each activation broadcast feeds two tiles.
//
// The instruction set is picked at run time (GCC's target attributes, `__builtin_cpu_supports`):
// AVX-512 VNNI, else AVX-VNNI (256-bit), else AVX2 + FMA + F16C, else portable C++ (what an ARM laptop
// gets, autovectorized).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK = 32;        // input columns per activation scale and per weight block
constexpr int64_t TILE = 16;         // output rows per tile
constexpr int ROWS_PER_PASS = 8;     // activation rows per pass over a weight tile
constexpr int PAIR_ROWS = 6;         // the same over two tiles (`pair_vnni`)
constexpr int64_t ROW_CHUNK = 64;    // activation rows kept in cache while a thread walks its tiles
constexpr int64_t PREFETCH = 6144;   // bytes ahead of the weight stream asked into L2 (`prefetch_ahead`)

// Bytes of one tile's block, and where its parts start, for int4 (SIX false) and int6.
template <bool SIX>
struct Layout {
  static constexpr int64_t high = 256;                 // the 2-bit plane (int6)
  static constexpr int64_t scales = SIX ? 384 : 256;   // fp16 scales, then lows
  static constexpr int64_t groups = SIX ? 2 : 1;       // scale/low groups per block
  static constexpr int64_t bytes = scales + groups * 2 * TILE * 2;  // 320 or 512
};

// The sub-scaled forms (SUB; GGUF's K-quants as they are stored): scales and lows made of 8-bit codes times
// factors per 256 columns (a super-block of SUPER blocks):
//   int6 (Q6_K): scale = d * sc, an int8 sc per 16 columns, low = -32 * scale, d fp32;
//   int4 (Q4_K): scale = d * sc, low = f * mn, a uint8 sc and mn per 32 columns (Q4_K's 6-bit codes), d and f
//     fp16 (as Q4_K stores them).
// A super-block holds the 16 rows' factors (int6: d; int4: d then f), then each block's 32 bytes of codes
// (int6: sc of its 2 groups x 16 rows; int4: 16 sc, then 16 mn), then its SUPER blocks' levels (as in a
// general block): every part on whole cache lines, read in the order they are laid out, a stream the
// hardware prefetches (with the levels first and the codes after them, one Zen 4 core read the 1.5B model's
// Q6_K head at 17-18 GB/s, in this order at 21). 3392 bytes (53 lines) for 4096 weights, 6.6 bits a weight
// against the general int6's 8; 2368 (37 lines), 4.625 bits against int4's 5.
constexpr int64_t SUPER = 8;

template <bool SIX>
struct Sub {
  static constexpr int64_t factors = 0;                        // 64 bytes for the 16 rows
  static constexpr int64_t codes = 4 * TILE;                   // then 2 * TILE bytes a block
  static constexpr int64_t levels = codes + SUPER * 2 * TILE;  // then each block's levels
  static constexpr int64_t block = SIX ? 384 : 256;            // a block's levels
  static constexpr int64_t bytes = levels + SUPER * block;     // 3392 or 2368
};
static_assert(Sub<true>::codes == Sub<false>::codes && Sub<true>::levels == Sub<false>::levels,
              "both forms' codes and levels start at one offset (pack_sub)");

// The levels of block b of a tile's weights, (SUB) its codes, and its super-block's factors.
template <bool SIX, bool SUB>
inline const uint8_t* block_at(const uint8_t* w, int64_t b) {
  if (SUB) return w + (b / SUPER) * Sub<SIX>::bytes + Sub<SIX>::levels + (b % SUPER) * Sub<SIX>::block;
  return w + b * Layout<SIX>::bytes;
}

template <bool SIX>
inline const uint8_t* codes_at(const uint8_t* w, int64_t b) {
  return w + (b / SUPER) * Sub<SIX>::bytes + Sub<SIX>::codes + (b % SUPER) * 2 * TILE;
}

template <bool SIX>
inline const uint8_t* factors_at(const uint8_t* w, int64_t b) {
  return w + (b / SUPER) * Sub<SIX>::bytes + Sub<SIX>::factors;
}

inline const float* super_d(const uint8_t* w, int64_t b) {
  return reinterpret_cast<const float*>(factors_at<true>(w, b));
}

// int8's packed tile: each block's levels (`block` bytes) in order, then each block's fp16 scales (`scales`);
// `bytes` a block in all, which names the layout (`matmul`).
struct Eight {
  static constexpr int64_t block = 16 * BLOCK;
  static constexpr int64_t scales = 2 * TILE;
  static constexpr int64_t bytes = block + scales;  // 544
};

inline const uint8_t* scales_at(const uint8_t* w, int64_t nb, int64_t b) {
  return w + nb * Eight::block + b * Eight::scales;
}

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

// Activations rounded per super-block (`group` 256) keep a finer d for a block whose values are small beside
// the super-block's largest: its d is the super-block's halved e times (0..FINER, the most that keeps the
// block's values within int8), so `tile_super_vnni` can still add the blocks' integer sums, each shifted left
// FINER - e bits, and apply d / 2^FINER once per super-block. On WikiText (the 1.5B model, 4096 tokens) one d
// per 256 columns raised perplexity 0.63% over the dequantized fp32 model, one per 32 0.09%, this -0.01%.
// FINER 3: Q6_K's sums over a super-block, shifted, still fit int32 (1.07e9), and Q4_K's `bsum` int16.
constexpr int FINER = 3;

// How many times (0..FINER) a block whose largest value is `block` can halve its group's d, the group's
// largest being `amax`.
inline int halvings(float block, float amax) {
  int e = 0;
  while (e < FINER && block * static_cast<float>(2 << e) <= amax) ++e;
  return e;
}

// One row of quantized activations: q (K int8); per block d, d * sum(q) (`dsum`) and d * sum(q) per
// half-block of 16 (`dhalf`, two per block); as integers, per block the left shift FINER - e (`shift`, 0 when
// rounded per block) and sum(q) shifted by it (`bsum`, int16: a dword is two blocks' sums), and -32 * sum(q)
// per half-block (`low6`, Q6_K's level offset times the activations).
struct Quantized {
  const int8_t* q;
  const float* d;
  const float* dsum;
  const float* dhalf;
  const int16_t* bsum;
  const int32_t* low6;
  const int32_t* shift;
};

// Where quantize_row writes a row's sums: the float ones (d, dsum, dhalf: 4 x nb floats) and the integer ones
// (low6: 2 x nb int32, shift: nb int32, bsum: nb int16).
struct Sums {
  float* d;
  float* dsum;
  float* dhalf;
  int16_t* bsum;
  int32_t* low6;
  int32_t* shift;
};

float half_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// The scale of block b of a group whose d is `scale` and largest value `amax` (the block's own largest
// `block`), and the factor its values are multiplied by to round them.
struct BlockScale {
  float d, inv;
  int shift;
};

inline BlockScale block_scale(float scale, float inv, float block, float amax, int64_t group) {
  if (group == BLOCK) return {scale, inv, 0};
  const int e = halvings(block, amax);
  const float times = static_cast<float>(1 << e);  // powers of 2: d and inv scale exactly
  return {scale / times, inv * times, FINER - e};
}

// Block b's d, d times the sums of its levels over the block (`dsum`) and each half (`dhalf`), and those sums
// as integers.
inline void block_sums(int64_t b, const BlockScale& bs, int s0, int s1, const Sums& out) {
  out.d[b] = bs.d;
  out.dsum[b] = bs.d * static_cast<float>(s0 + s1);
  out.dhalf[2 * b] = bs.d * static_cast<float>(s0);
  out.dhalf[2 * b + 1] = bs.d * static_cast<float>(s1);
  out.bsum[b] = static_cast<int16_t>((s0 + s1) * (1 << bs.shift));
  out.low6[2 * b] = -32 * s0;
  out.low6[2 * b + 1] = -32 * s1;
  out.shift[b] = bs.shift;
}

// A row's groups of `group` columns (32 or 256) to int8 q, d = absmax / 127 a group (a block's finer, above),
// rounded half to even (as nearbyint in the default rounding mode), with the sums above per block of 32; with
// `rest`, also x - q * d (what the rounding lost, for `precise`). Portable C++; the AVX2 and AVX-512 forms
// below give the same levels.
void quantize_row(const float* x, int64_t k, int64_t group, int8_t* q, const Sums& out, float* rest) {
  for (int64_t g = 0; g < k / group; ++g) {
    float block[SUPER] = {}, amax = 0.f;
    for (int64_t i = 0; i < group; ++i) {
      block[i / BLOCK] = std::max(block[i / BLOCK], std::fabs(x[g * group + i]));
      amax = std::max(amax, block[i / BLOCK]);
    }
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t j = 0; j < group / BLOCK; ++j) {
      const int64_t b = g * group / BLOCK + j;
      const BlockScale bs = block_scale(scale, inv, block[j], amax, group);
      int sums[2] = {0, 0};
      for (int i = 0; i < BLOCK; ++i) {
        const float xi = x[b * BLOCK + i];
        const int v = static_cast<int>(std::nearbyint(xi * bs.inv));
        q[b * BLOCK + i] = static_cast<int8_t>(v);
        sums[i / 16] += v;
        if (rest) rest[b * BLOCK + i] = xi - static_cast<float>(v) * bs.d;
      }
      block_sums(b, bs, sums[0], sums[1], out);
    }
  }
}

// Level of row o, column c (0..31) of a tile's block.
template <bool SIX>
int level(const uint8_t* wb, int o, int c) {
  const int half = c / 16, j = (c % 16) / 4, p = c % 4;
  const uint8_t byte = wb[64 * j + 4 * o + p];
  int l = half ? byte >> 4 : byte & 0x0F;
  if (SIX) l |= ((wb[Layout<SIX>::high + 64 * half + 4 * o + p] >> (2 * j)) & 3) << 4;
  return l;
}

// One tile, `rows` activation rows (1..ROWS_PER_PASS), portable C++.
template <bool SIX, bool SUB>
void tile_portable(const uint8_t* w, int64_t nb, const Quantized* a, int rows, float* y, int64_t ystride,
                   int valid) {
  using L = Layout<SIX>;
  float acc[ROWS_PER_PASS][TILE] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = block_at<SIX, SUB>(w, b);
    const uint16_t* sm = reinterpret_cast<const uint16_t*>(wb + L::scales);
    const uint8_t* codes = SUB ? codes_at<SIX>(w, b) : nullptr;  // int6's are int8, int4's uint8
    const uint16_t* factors = SUB ? reinterpret_cast<const uint16_t*>(factors_at<SIX>(w, b)) : nullptr;
    for (int r = 0; r < rows; ++r) {
      const int8_t* qb = a[r].q + b * BLOCK;
      for (int o = 0; o < TILE; ++o) {
        int sums[2] = {0, 0};
        for (int c = 0; c < BLOCK; ++c) sums[c / 16] += level<SIX>(wb, o, c) * qb[c];
        float total = 0.f;
        if (SIX) {
          for (int g = 0; g < 2; ++g) {
            const float s = SUB ? super_d(w, b)[o] * static_cast<int8_t>(codes[TILE * g + o])
                                : half_to_float(sm[TILE * g + o]);
            const float m = SUB ? -32.f * s : half_to_float(sm[TILE * (2 + g) + o]);
            total += s * a[r].d[b] * static_cast<float>(sums[g]) + m * a[r].dhalf[2 * b + g];
          }
        } else {
          const float s = SUB ? half_to_float(factors[o]) * codes[o] : half_to_float(sm[o]);
          const float m = SUB ? half_to_float(factors[TILE + o]) * codes[TILE + o] : half_to_float(sm[TILE + o]);
          total = s * a[r].d[b] * static_cast<float>(sums[0] + sums[1]) + m * a[r].dsum[b];
        }
        acc[r][o] += total;
      }
    }
  }
  for (int r = 0; r < rows; ++r) std::memcpy(y + r * ystride, acc[r], valid * sizeof(float));
}

// int8: one tile, `rows` activation rows, portable C++.
void tile8_portable(const uint8_t* w, int64_t nb, const Quantized* a, int rows, float* y, int64_t ystride,
                    int valid) {
  float acc[ROWS_PER_PASS][TILE] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = reinterpret_cast<const int8_t*>(w + b * Eight::block);
    const uint16_t* sm = reinterpret_cast<const uint16_t*>(scales_at(w, nb, b));
    for (int r = 0; r < rows; ++r) {
      const int8_t* qb = a[r].q + b * BLOCK;
      for (int o = 0; o < TILE; ++o) {
        int sum = 0;
        for (int c = 0; c < BLOCK; ++c) sum += wb[64 * (c / 4) + 4 * o + c % 4] * qb[c];
        acc[r][o] += half_to_float(sm[o]) * a[r].d[b] * static_cast<float>(sum);
      }
    }
  }
  for (int r = 0; r < rows; ++r) std::memcpy(y + r * ystride, acc[r], valid * sizeof(float));
}

#if defined(__x86_64__)

// The cache lines PREFETCH bytes ahead of block b of a tile's weights (at w) into L2: the weights stream
// through memory in order, a block's share of them at a time (SUB: an eighth of its super-block's bytes).
// Into L2 rather than L1: L1 holds few misses in flight, L2 many, and one core's stream is bounded by the
// misses in flight. On one Zen 4 core, one row (GB/s of Q4_K / Q6_K tiles from memory, three rounds
// alternated): 4096 bytes ahead into L1 19.0 / 19.6, into L2 23.0 / 23.0 at 6144 bytes, 22.1 / 20.6 at 8192.
template <bool SIX, bool SUB>
inline void prefetch_ahead(const uint8_t* w, int64_t b) {
  constexpr int64_t step = SUB ? Sub<SIX>::bytes / SUPER : Layout<SIX>::bytes;  // 424, 296; 320, 512
  const uint8_t* from = w + b * step + PREFETCH;  // each line once: those starting in [from, from + step)
  const uint8_t* line = from + ((64 - reinterpret_cast<uintptr_t>(from) % 64) % 64);
  for (; line < from + step; line += 64) _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T1);
}

// int8's two streams: block b's levels PREFETCH bytes ahead, and its scales as far ahead in blocks. Always
// inlined: GCC took the call, not inlined early, for one without effects and deleted it.
__attribute__((always_inline)) inline void prefetch8(const uint8_t* w, int64_t nb, int64_t b) {
  const uint8_t* line = w + b * Eight::block + PREFETCH;
  for (int i = 0; i < Eight::block / 64; ++i) _mm_prefetch(reinterpret_cast<const char*>(line + 64 * i), _MM_HINT_T1);
  if (b % 2 == 0) {
    _mm_prefetch(reinterpret_cast<const char*>(scales_at(w, nb, b + PREFETCH / Eight::block)), _MM_HINT_T1);
  }
}

AVX2 inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Eight fp16 values as fp32.
AVX2 inline __m256 half8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Scale and low of group g (int6: 0, 1; int4: 0) for rows 8h..8h+7 of block b (at wb) of a tile (at w).
template <bool SIX, bool SUB>
AVX2 inline void scales8(const uint8_t* w, const uint8_t* wb, int64_t b, int g, int h, __m256& s, __m256& m) {
  if (SUB && SIX) {
    const __m128i sc = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes_at<SIX>(w, b) + TILE * g + 8 * h));
    s = _mm256_mul_ps(_mm256_loadu_ps(super_d(w, b) + 8 * h), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
    m = _mm256_mul_ps(s, _mm256_set1_ps(-32.f));
  } else if (SUB) {
    const uint8_t *codes = codes_at<SIX>(w, b), *f = factors_at<SIX>(w, b);
    const __m128i sc = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * h));
    const __m128i mn = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + TILE + 8 * h));
    s = _mm256_mul_ps(half8(f + 16 * h), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)));
    m = _mm256_mul_ps(half8(f + 2 * TILE + 16 * h), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)));
  } else {
    s = half8(wb + Layout<SIX>::scales + 32 * g + 16 * h);
    m = half8(wb + Layout<SIX>::scales + 32 * Layout<SIX>::groups + 32 * g + 16 * h);
  }
}

// The top 2 bits of register f of a plane chunk, at bits 4-5 of each byte (see the layout).
template <int F>
AVX2 inline __m256i top_bits(__m256i plane, __m256i mask) {
  if (F == 0) return _mm256_and_si256(_mm256_slli_epi16(plane, 4), mask);
  if (F == 1) return _mm256_and_si256(_mm256_slli_epi16(plane, 2), mask);
  if (F == 2) return _mm256_and_si256(plane, mask);
  return _mm256_and_si256(_mm256_srli_epi16(plane, 2), mask);
}

// Rows 0-7 of a tile are bytes 0..31 of each 64-byte chunk, rows 8-15 bytes 32..63: two 8-lane halves.
// The levels of half `h` of a tile's block: v[j] four per row for columns 4j..4j+3, v[4 + j] for 16+4j...
template <bool SIX>
AVX2 inline void half_levels(const uint8_t* wb, int h, __m256i v[8]) {
  const __m256i mask = _mm256_set1_epi8(0x0F), top = _mm256_set1_epi8(0x30);
  for (int j = 0; j < 4; ++j) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j + 32 * h));
    v[j] = _mm256_and_si256(c, mask);
    v[4 + j] = _mm256_and_si256(_mm256_srli_epi16(c, 4), mask);
  }
  if (SIX) {
    for (int c = 0; c < 2; ++c) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + Layout<SIX>::high + 64 * c + 32 * h));
      v[4 * c] = _mm256_or_si256(v[4 * c], top_bits<0>(p, top));
      v[4 * c + 1] = _mm256_or_si256(v[4 * c + 1], top_bits<1>(p, top));
      v[4 * c + 2] = _mm256_or_si256(v[4 * c + 2], top_bits<2>(p, top));
      v[4 * c + 3] = _mm256_or_si256(v[4 * c + 3], top_bits<3>(p, top));
    }
  }
}

// The `valid` outputs of R rows, each accumulated in two 8-lane halves.
template <int R>
AVX2 inline void store_halves(const __m256 (&acc)[R][2], float* y, int64_t ystride, int valid) {
  for (int r = 0; r < R; ++r) {
    alignas(32) float out[TILE];
    _mm256_store_ps(out, acc[r][0]);
    _mm256_store_ps(out + 8, acc[r][1]);
    std::memcpy(y + r * ystride, out, valid * sizeof(float));
  }
}

template <bool SIX, bool SUB, int R>
AVX2 void tile_avx2(const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = block_at<SIX, SUB>(w, b);
    prefetch_ahead<SIX, SUB>(w, b);
    for (int h = 0; h < 2; ++h) {
      __m256i v[8];
      half_levels<SIX>(wb, h, v);
      for (int r = 0; r < R; ++r) {
        const int8_t* qb = a[r].q + b * BLOCK;
        __m256i p[8];
        for (int i = 0; i < 8; ++i) p[i] = _mm256_maddubs_epi16(v[i], bcast4(qb + 4 * i));
        if (SIX) {  // int16 holds two pairs of 6-bit products: 2 * 2 * 63 * 127 = 32004
          for (int g = 0; g < 2; ++g) {
            const __m256i i32 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(p[4 * g], p[4 * g + 1]), ones),
                                                 _mm256_madd_epi16(_mm256_add_epi16(p[4 * g + 2], p[4 * g + 3]), ones));
            __m256 s, m;
            scales8<SIX, SUB>(w, wb, b, g, h, s, m);
            acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_mul_ps(s, _mm256_set1_ps(a[r].d[b])), acc[r][h]);
            acc[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(a[r].dhalf[2 * b + g]), acc[r][h]);
          }
        } else {
          for (int i = 1; i < 8; ++i) p[0] = _mm256_add_epi16(p[0], p[i]);
          const __m256i i32 = _mm256_madd_epi16(p[0], ones);
          __m256 s, m;
          scales8<SIX, SUB>(w, wb, b, 0, h, s, m);
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_mul_ps(s, _mm256_set1_ps(a[r].d[b])), acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(a[r].dsum[b]), acc[r][h]);
        }
      }
    }
  }
  store_halves<R>(acc, y, ystride, valid);
}

// AVX-VNNI (256-bit `dpbusd` without AVX-512: Intel's laptop cores since Alder Lake): AVX2's two 8-row
// halves (and its helpers: their instruction set is a subset of this one, so they inline), each
// instruction four levels x four activations as with AVX-512 VNNI.
template <bool SIX, bool SUB, int R>
AVXVNNI void tile_avxvnni(const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = block_at<SIX, SUB>(w, b);
    prefetch_ahead<SIX, SUB>(w, b);
    for (int h = 0; h < 2; ++h) {
      __m256i v[8];
      half_levels<SIX>(wb, h, v);
      __m256 s0, m0, s1, m1;
      scales8<SIX, SUB>(w, wb, b, 0, h, s0, m0);
      if (SIX) scales8<SIX, SUB>(w, wb, b, 1, h, s1, m1);
      for (int r = 0; r < R; ++r) {
        const int8_t* qb = a[r].q + b * BLOCK;
        __m256i i0 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), v[0], bcast4(qb));
        __m256i i1 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), v[4], bcast4(qb + 16));
        for (int j = 1; j < 4; ++j) {
          i0 = _mm256_dpbusd_avx_epi32(i0, v[j], bcast4(qb + 4 * j));
          i1 = _mm256_dpbusd_avx_epi32(i1, v[4 + j], bcast4(qb + 16 + 4 * j));
        }
        const __m256 d = _mm256_set1_ps(a[r].d[b]);
        if (SIX) {
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(s0, d), acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_mul_ps(s1, d), acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(m0, _mm256_set1_ps(a[r].dhalf[2 * b]), acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(m1, _mm256_set1_ps(a[r].dhalf[2 * b + 1]), acc[r][h]);
        } else {
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(i0, i1)), _mm256_mul_ps(s0, d), acc[r][h]);
          acc[r][h] = _mm256_fmadd_ps(m0, _mm256_set1_ps(a[r].dsum[b]), acc[r][h]);
        }
      }
    }
  }
  store_halves<R>(acc, y, ystride, valid);
}

// int8 on AVX2: `maddubs` takes each level's magnitude against the activations with its sign (products to
// 128 * 127, a pair's sum 32512: within int16), widened to int32 per four columns.
template <int R>
AVX2 void tile8_avx2(const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * Eight::block;
    prefetch8(w, nb, b);
    for (int h = 0; h < 2; ++h) {
      __m256i v[8];
      for (int j = 0; j < 8; ++j) v[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j + 32 * h));
      const __m256 s = half8(scales_at(w, nb, b) + 16 * h);
      for (int r = 0; r < R; ++r) {
        const int8_t* qb = a[r].q + b * BLOCK;
        __m256i i32 = _mm256_setzero_si256();
        for (int j = 0; j < 8; ++j) {
          const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(v[j]), _mm256_sign_epi8(bcast4(qb + 4 * j), v[j]));
          i32 = _mm256_add_epi32(i32, _mm256_madd_epi16(p, ones));
        }
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_mul_ps(s, _mm256_set1_ps(a[r].d[b])), acc[r][h]);
      }
    }
  }
  store_halves<R>(acc, y, ystride, valid);
}

// -128 times the sum of a row's activations over block b: where a VNNI kernel's sum of (level + 128) * q starts.
inline int32_t offset8(const Quantized& a, int64_t b) {
  return 4 * (a.low6[2 * b] + a.low6[2 * b + 1]);
}

// int8 on AVX-VNNI: the levels flipped to level + 128 (unsigned, as `dpbusd` takes them), each row's sum started
// at `offset8`.
template <int R>
AVXVNNI void tile8_avxvnni(const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * Eight::block;
    prefetch8(w, nb, b);
    for (int h = 0; h < 2; ++h) {
      __m256i v[8];
      for (int j = 0; j < 8; ++j) {
        v[j] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j + 32 * h)), flip);
      }
      const __m256 s = half8(scales_at(w, nb, b) + 16 * h);
      for (int r = 0; r < R; ++r) {
        const int8_t* qb = a[r].q + b * BLOCK;
        __m256i i0 = _mm256_dpbusd_avx_epi32(_mm256_set1_epi32(offset8(a[r], b)), v[0], bcast4(qb));
        __m256i i1 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), v[4], bcast4(qb + 16));
        for (int j = 1; j < 4; ++j) {
          i0 = _mm256_dpbusd_avx_epi32(i0, v[j], bcast4(qb + 4 * j));
          i1 = _mm256_dpbusd_avx_epi32(i1, v[4 + j], bcast4(qb + 16 + 4 * j));
        }
        const __m256 i32 = _mm256_cvtepi32_ps(_mm256_add_epi32(i0, i1));
        acc[r][h] = _mm256_fmadd_ps(i32, _mm256_mul_ps(s, _mm256_set1_ps(a[r].d[b])), acc[r][h]);
      }
    }
  }
  store_halves<R>(acc, y, ystride, valid);
}

VNNI inline __m512i bcast4_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

VNNI inline __m512 half16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Scale and low of group g (int6: 0, 1; int4: 0) for the 16 rows of block b (at wb) of a tile (at w).
template <bool SIX, bool SUB>
VNNI inline void scales16(const uint8_t* w, const uint8_t* wb, int64_t b, int g, __m512& s, __m512& m) {
  if (SUB && SIX) {
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes_at<SIX>(w, b) + TILE * g));
    s = _mm512_mul_ps(_mm512_loadu_ps(super_d(w, b)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
    m = _mm512_mul_ps(s, _mm512_set1_ps(-32.f));
  } else if (SUB) {
    const uint8_t *codes = codes_at<SIX>(w, b), *f = factors_at<SIX>(w, b);
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
    const __m128i mn = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + TILE));
    s = _mm512_mul_ps(half16(f), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
    m = _mm512_mul_ps(half16(f + 2 * TILE), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn)));
  } else {
    s = half16(wb + Layout<SIX>::scales + 32 * g);
    m = half16(wb + Layout<SIX>::scales + 32 * Layout<SIX>::groups + 32 * g);
  }
}

template <int F>
VNNI inline __m512i top_bits_512(__m512i plane, __m512i mask) {
  if (F == 0) return _mm512_and_si512(_mm512_slli_epi16(plane, 4), mask);
  if (F == 1) return _mm512_and_si512(_mm512_slli_epi16(plane, 2), mask);
  if (F == 2) return _mm512_and_si512(plane, mask);
  return _mm512_and_si512(_mm512_srli_epi16(plane, 2), mask);
}

// One tile on AVX-512 VNNI, the scales applied in fp32 block by block: the general layouts, and the
// K-quants' with one activation row (decode; see `tile_super_vnni`).
template <bool SIX, bool SUB, int R>
VNNI void tile_vnni(const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
  using L = Layout<SIX>;
  const __m512i mask = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = block_at<SIX, SUB>(w, b);
    prefetch_ahead<SIX, SUB>(w, b);
    __m512i v[8];
    for (int j = 0; j < 4; ++j) {
      const __m512i c = _mm512_loadu_si512(wb + 64 * j);
      v[j] = _mm512_and_si512(c, mask);
      v[4 + j] = _mm512_and_si512(_mm512_srli_epi16(c, 4), mask);
    }
    if (SIX) {
      for (int c = 0; c < 2; ++c) {
        const __m512i p = _mm512_loadu_si512(wb + L::high + 64 * c);
        v[4 * c] = _mm512_or_si512(v[4 * c], top_bits_512<0>(p, top));
        v[4 * c + 1] = _mm512_or_si512(v[4 * c + 1], top_bits_512<1>(p, top));
        v[4 * c + 2] = _mm512_or_si512(v[4 * c + 2], top_bits_512<2>(p, top));
        v[4 * c + 3] = _mm512_or_si512(v[4 * c + 3], top_bits_512<3>(p, top));
      }
    }
    __m512 s0, m0, s1, m1;
    scales16<SIX, SUB>(w, wb, b, 0, s0, m0);
    if (SIX) {
      scales16<SIX, SUB>(w, wb, b, 1, s1, m1);
    } else {
      s1 = s0, m1 = m0;
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* qb = a[r].q + b * BLOCK;
      __m512i i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[0], bcast4_512(qb));
      __m512i i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[4], bcast4_512(qb + 16));
      for (int j = 1; j < 4; ++j) {
        i0 = _mm512_dpbusd_epi32(i0, v[j], bcast4_512(qb + 4 * j));
        i1 = _mm512_dpbusd_epi32(i1, v[4 + j], bcast4_512(qb + 16 + 4 * j));
      }
      const __m512 d = _mm512_set1_ps(a[r].d[b]);
      if (SIX) {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(s0, d), acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(s1, d), acc[r]);
        acc[r] = _mm512_fmadd_ps(m0, _mm512_set1_ps(a[r].dhalf[2 * b]), acc[r]);
        acc[r] = _mm512_fmadd_ps(m1, _mm512_set1_ps(a[r].dhalf[2 * b + 1]), acc[r]);
      } else {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)), _mm512_mul_ps(s0, d), acc[r]);
        acc[r] = _mm512_fmadd_ps(m0, _mm512_set1_ps(a[r].dsum[b]), acc[r]);
      }
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ystride, keep, acc[r]);
}

// Each of R rows' integer sums over block b: the block's 8 level registers v (v[j] four columns 4j.. of the 16
// rows) against the row's activations, `dpbusd` by `dpbusd`, started at init[r]. One chain a row, the rows'
// chains interleaved; fewer than 4 rows, two chains a row (added at the end). Interleaved, 8 rows ran 1.2-1.3x
// faster than row after row (Q4_K, `tile_super_vnni`).
template <int R>
VNNI inline void block_dots(const __m512i (&v)[8], const Quantized* a, int64_t b, const __m512i (&init)[R],
                            __m512i (&out)[R]) {
  constexpr int C = R < 4 ? 2 : 1;
  __m512i i[R][C];
  for (int r = 0; r < R; ++r) {
    i[r][0] = init[r];
    if (C == 2) i[r][C - 1] = _mm512_setzero_si512();
  }
  for (int j = 0; j < 4; ++j) {
    for (int h = 0; h < 2; ++h) {
      for (int r = 0; r < R; ++r) {
        __m512i& chain = i[r][h % C];
        chain = _mm512_dpbusd_epi32(chain, v[4 * h + j], bcast4_512(a[r].q + b * BLOCK + 16 * h + 4 * j));
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = C == 2 ? _mm512_add_epi32(i[r][0], i[r][C - 1]) : i[r][0];
}

// int8 on AVX-512 VNNI, as on AVX-VNNI (`tile8_avxvnni`) with all 16 rows of a tile in one register.
template <int R>
VNNI void tile8_vnni(const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + b * Eight::block;
    prefetch8(w, nb, b);
    __m512i v[8];
    for (int j = 0; j < 8; ++j) v[j] = _mm512_xor_si512(_mm512_loadu_si512(wb + 64 * j), flip);
    const __m512 s = half16(scales_at(w, nb, b));
    __m512i init[R], sums[R];
    for (int r = 0; r < R; ++r) init[r] = _mm512_set1_epi32(offset8(a[r], b));
    block_dots<R>(v, a, b, init, sums);
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]), _mm512_mul_ps(s, _mm512_set1_ps(a[r].d[b])), acc[r]);
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ystride, keep, acc[r]);
}

// Block b's left shift (as `sllv` takes it); the d that the shifted sums of b's super-block are in.
VNNI inline __m512i shift(const Quantized& a, int64_t b) {
  return _mm512_set1_epi32(a.shift[b]);
}

inline float unshifted(const Quantized& a, int64_t b) {
  return a.d[b] / static_cast<float>(1 << a.shift[b]);  // exact (a power of 2), and no call to spill around
}

// 16 uint8 codes as int32 lanes.
VNNI inline __m512i codes16(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The K-quants' layouts (SUB) on AVX-512 VNNI with 2 to 8 activation rows: a block's integer sums are
// multiplied by its 8-bit scale codes (shifted as the activations' block asks, `shift`) in int32 and added up
// over the super-block, so the float work (convert, the factors, the activations' d) is once per 256 columns,
// not once per 32 as in `tile_vnni`: at 8 rows 1.2-1.3x faster without that work, 1.1x faster than the
// two-tile kernel at 512 (Q4_K's gate/up and down, one Zen 4 core). Q6_K's level offset starts each
// group's sum (`low6`: -32 times the activations' sum); Q4_K's lows are its codes mn times the blocks'
// activation sums, two blocks a `dpwssd` (`bsum`), once per super-block. The rows' chains of `dpbusd` are
// interleaved (row by row ran 1.3x slower at 8 rows). One row (decode) stays on `tile_vnni`, 5-15% faster
// there; so a row alone and the same row among others differ in their last bits.
template <bool SIX, int R>
VNNI void tile_super_vnni(const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
  using L = Layout<SIX>;
  const __m512i mask = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t first = 0; first < nb; first += SUPER) {
    __m512i sums[R];
    for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_si512();
    for (int64_t b = first; b < first + SUPER; ++b) {
      const uint8_t* wb = block_at<SIX, true>(w, b);
      prefetch_ahead<SIX, true>(w, b);
      __m512i v[8];
      for (int j = 0; j < 4; ++j) {
        const __m512i c = _mm512_loadu_si512(wb + 64 * j);
        v[j] = _mm512_and_si512(c, mask);
        v[4 + j] = _mm512_and_si512(_mm512_srli_epi16(c, 4), mask);
      }
      const uint8_t* codes = codes_at<SIX>(w, b);
      if (SIX) {
        for (int c = 0; c < 2; ++c) {
          const __m512i p = _mm512_loadu_si512(wb + L::high + 64 * c);
          v[4 * c] = _mm512_or_si512(v[4 * c], top_bits_512<0>(p, top));
          v[4 * c + 1] = _mm512_or_si512(v[4 * c + 1], top_bits_512<1>(p, top));
          v[4 * c + 2] = _mm512_or_si512(v[4 * c + 2], top_bits_512<2>(p, top));
          v[4 * c + 3] = _mm512_or_si512(v[4 * c + 3], top_bits_512<3>(p, top));
        }
        for (int g = 0; g < 2; ++g) {
          const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + TILE * g)));
          __m512i i[R];
          for (int r = 0; r < R; ++r) i[r] = _mm512_set1_epi32(a[r].low6[2 * b + g]);
          for (int j = 0; j < 4; ++j) {
            for (int r = 0; r < R; ++r) {
              i[r] = _mm512_dpbusd_epi32(i[r], v[4 * g + j], bcast4_512(a[r].q + b * BLOCK + 16 * g + 4 * j));
            }
          }
          for (int r = 0; r < R; ++r) {
            sums[r] = _mm512_add_epi32(sums[r], _mm512_mullo_epi32(i[r], _mm512_sllv_epi32(sc, shift(a[r], b))));
          }
        }
      } else {
        const __m512i sc = codes16(codes);
        __m512i zero[R], block[R];
        for (int r = 0; r < R; ++r) zero[r] = _mm512_setzero_si512();
        block_dots<R>(v, a, b, zero, block);
        for (int r = 0; r < R; ++r) {
          sums[r] = _mm512_add_epi32(sums[r], _mm512_mullo_epi32(block[r], _mm512_sllv_epi32(sc, shift(a[r], b))));
        }
      }
    }
    if (SIX) {
      const __m512 dw = _mm512_loadu_ps(super_d(w, first));
      for (int r = 0; r < R; ++r) {
        const __m512 da = _mm512_set1_ps(unshifted(a[r], first));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]), _mm512_mul_ps(dw, da), acc[r]);
      }
    } else {
      const uint8_t* f = factors_at<SIX>(w, first);
      const __m512 dw = half16(f), fw = half16(f + 2 * TILE);
      __m512i mn[SUPER / 2];  // lane o: row o's mn of blocks 2i and 2i + 1, as two int16
      for (int i = 0; i < SUPER / 2; ++i) {
        mn[i] = _mm512_or_si512(codes16(codes_at<SIX>(w, first + 2 * i) + TILE),
                                _mm512_slli_epi32(codes16(codes_at<SIX>(w, first + 2 * i + 1) + TILE), 16));
      }
      for (int r = 0; r < R; ++r) {
        __m512i lows = _mm512_setzero_si512();
        for (int i = 0; i < SUPER / 2; ++i) {
          int32_t pair;
          std::memcpy(&pair, a[r].bsum + first + 2 * i, 4);
          lows = _mm512_dpwssd_epi32(lows, mn[i], _mm512_set1_epi32(pair));
        }
        const __m512 da = _mm512_set1_ps(unshifted(a[r], first));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]), _mm512_mul_ps(dw, da), acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lows), _mm512_mul_ps(fw, da), acc[r]);
      }
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ystride, keep, acc[r]);
}

// int4, two adjacent tiles (32 output rows, the second `next` bytes after the first) at once: each
// broadcast of four activation bytes feeds two `dpbusd`, and a row's sum over a block is one chain per
// tile. On an Ice Lake Xeon the broadcasts, not the `dpbusd`, bounded the one-tile kernel with many rows:
// this one runs 1.2-1.3x faster (one core, 64 rows, 1536 x 1536 to 8960 x 1536). Up to ROWS_PER_PASS
// rows (decode, batches of up to 8) keep the one-tile kernel: one pass over weights streamed from memory
// beat 6 + 2 rows in two (batch-8 decode of the 1.5B model 50-61 against 46-53 tok/s), and so does int6
// (the same scheme measured 0.8x for it).
// The K-quants' layouts do not take it: `tile_super_vnni` ran Q4_K's gate/up and down 1.1x faster at 512
// rows (one Zen 4 core), and gives a row the same bits alone as in a batch.
template <int R>
VNNI void pair_vnni(const uint8_t* w, int64_t next, int64_t nb, const Quantized* a, float* y, int64_t ystride,
                    int valid) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb[2] = {block_at<false, false>(w, b), block_at<false, false>(w + next, b)};
    prefetch_ahead<false, false>(w, b);
    prefetch_ahead<false, false>(w + next, b);
    __m512i sums[R][2];
    for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
      __m512i lo[2], hi[2];
      for (int t = 0; t < 2; ++t) {
        const __m512i c = _mm512_loadu_si512(wb[t] + 64 * j);
        lo[t] = _mm512_and_si512(c, mask);
        hi[t] = _mm512_and_si512(_mm512_srli_epi16(c, 4), mask);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* qb = a[r].q + b * BLOCK;
        const __m512i xl = bcast4_512(qb + 4 * j), xh = bcast4_512(qb + 16 + 4 * j);
        for (int t = 0; t < 2; ++t) {
          sums[r][t] = _mm512_dpbusd_epi32(sums[r][t], lo[t], xl);
          sums[r][t] = _mm512_dpbusd_epi32(sums[r][t], hi[t], xh);
        }
      }
    }
    for (int t = 0; t < 2; ++t) {
      __m512 s, m;
      scales16<false, false>(t ? w + next : w, wb[t], b, 0, s, m);
      for (int r = 0; r < R; ++r) {
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][t]), _mm512_mul_ps(s, _mm512_set1_ps(a[r].d[b])), acc[r][t]);
        acc[r][t] = _mm512_fmadd_ps(m, _mm512_set1_ps(a[r].dsum[b]), acc[r][t]);
      }
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << (valid - TILE)) - 1);
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(y + r * ystride, acc[r][0]);
    _mm512_mask_storeu_ps(y + r * ystride + TILE, keep, acc[r][1]);
  }
}

// `quantize_row` on AVX2: a block is four registers of 8 floats.
AVX2 inline int sum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

AVX2 inline float max8(__m256 m) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

AVX2 void quantize_row_avx2(const float* x, int64_t k, int64_t group, int8_t* q, const Sums& out, float* rest) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < k / group; ++g) {
    float block[SUPER], amax = 0.f;
    for (int64_t j = 0; j < group / BLOCK; ++j) {
      __m256 m = _mm256_setzero_ps();
      for (int i = 0; i < BLOCK; i += 8) {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + g * group + j * BLOCK + i)));
      }
      block[j] = max8(m);
      amax = std::max(amax, block[j]);
    }
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t j = 0; j < group / BLOCK; ++j) {
      const int64_t b = g * group / BLOCK + j;
      const BlockScale bs = block_scale(scale, inv, block[j], amax, group);
      __m256 xs[4];
      __m256i v[4];
      for (int i = 0; i < 4; ++i) {
        xs[i] = _mm256_loadu_ps(x + b * BLOCK + 8 * i);
        v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(xs[i], _mm256_set1_ps(bs.inv)));
      }
      // packs work within 128-bit lanes: 4-byte groups come out as 0, 2, 4, 6, 1, 3, 5, 7; `order` mends that
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * BLOCK), _mm256_permutevar8x32_epi32(bytes, order));
      block_sums(b, bs, sum8(_mm256_add_epi32(v[0], v[1])), sum8(_mm256_add_epi32(v[2], v[3])), out);
      if (rest) {
        for (int i = 0; i < 4; ++i) {
          const __m256 lost = _mm256_mul_ps(_mm256_cvtepi32_ps(v[i]), _mm256_set1_ps(bs.d));
          _mm256_storeu_ps(rest + b * BLOCK + 8 * i, _mm256_sub_ps(xs[i], lost));
        }
      }
    }
  }
}

// `quantize_row` on AVX-512: a block is two registers.
VNNI void quantize_row_512(const float* x, int64_t k, int64_t group, int8_t* q, const Sums& out, float* rest) {
  for (int64_t g = 0; g < k / group; ++g) {
    float block[SUPER], amax = 0.f;
    for (int64_t j = 0; j < group / BLOCK; ++j) {
      const float* xb = x + g * group + j * BLOCK;
      const __m512 both = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xb)), _mm512_abs_ps(_mm512_loadu_ps(xb + 16)));
      block[j] = _mm512_reduce_max_ps(both);
      amax = std::max(amax, block[j]);
    }
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t j = 0; j < group / BLOCK; ++j) {
      const int64_t b = g * group / BLOCK + j;
      const BlockScale bs = block_scale(scale, inv, block[j], amax, group);
      const __m512 x0 = _mm512_loadu_ps(x + b * BLOCK), x1 = _mm512_loadu_ps(x + b * BLOCK + 16);
      const __m512i v0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(bs.inv)));
      const __m512i v1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(bs.inv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * BLOCK), _mm512_cvtepi32_epi8(v0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * BLOCK + 16), _mm512_cvtepi32_epi8(v1));
      block_sums(b, bs, _mm512_reduce_add_epi32(v0), _mm512_reduce_add_epi32(v1), out);
      if (rest) {
        const __m512 sc = _mm512_set1_ps(bs.d);
        _mm512_storeu_ps(rest + b * BLOCK, _mm512_sub_ps(x0, _mm512_mul_ps(_mm512_cvtepi32_ps(v0), sc)));
        _mm512_storeu_ps(rest + b * BLOCK + 16, _mm512_sub_ps(x1, _mm512_mul_ps(_mm512_cvtepi32_ps(v1), sc)));
      }
    }
  }
}

#endif

enum class Isa { portable, avx2, avxvnni, avx512vnni };

Isa parse(const std::string& isa) {
  if (isa == "avx512vnni") return Isa::avx512vnni;
  if (isa == "avxvnni") return Isa::avxvnni;
  if (isa == "avx2") return Isa::avx2;
  TORCH_CHECK(isa == "portable", "isa: avx512vnni, avxvnni, avx2 or portable, not ", isa);
  return Isa::portable;
}

template <bool SIX, bool SUB, int R>
void tile_rows(Isa isa, const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
#if defined(__x86_64__)
  if (isa == Isa::avx512vnni) {
    if constexpr (SUB && R > 1) return tile_super_vnni<SIX, R>(w, nb, a, y, ystride, valid);
    return tile_vnni<SIX, SUB, R>(w, nb, a, y, ystride, valid);
  }
  if (isa == Isa::avxvnni) return tile_avxvnni<SIX, SUB, R>(w, nb, a, y, ystride, valid);
  if (isa == Isa::avx2) return tile_avx2<SIX, SUB, R>(w, nb, a, y, ystride, valid);
#endif
  tile_portable<SIX, SUB>(w, nb, a, R, y, ystride, valid);
}

template <int R>
void tile8_rows(Isa isa, const uint8_t* w, int64_t nb, const Quantized* a, float* y, int64_t ystride, int valid) {
#if defined(__x86_64__)
  if (isa == Isa::avx512vnni) return tile8_vnni<R>(w, nb, a, y, ystride, valid);
  if (isa == Isa::avxvnni) return tile8_avxvnni<R>(w, nb, a, y, ystride, valid);
  if (isa == Isa::avx2) return tile8_avx2<R>(w, nb, a, y, ystride, valid);
#endif
  tile8_portable(w, nb, a, R, y, ystride, valid);
}

// f(std::integral_constant<int, R>) for R = rows (1..ROWS_PER_PASS): the row count as a template argument.
template <typename F>
void by_rows(int rows, F f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, ROWS_PER_PASS>{});
  }
}

template <bool SIX, bool SUB = false>
void tile(Isa isa, const uint8_t* w, int64_t nb, const Quantized* a, int rows, float* y, int64_t ystride,
          int valid) {
  by_rows(rows, [&](auto r) { tile_rows<SIX, SUB, decltype(r)::value>(isa, w, nb, a, y, ystride, valid); });
}

void tile8(Isa isa, const uint8_t* w, int64_t nb, const Quantized* a, int rows, float* y, int64_t ystride, int valid) {
  by_rows(rows, [&](auto r) { tile8_rows<decltype(r)::value>(isa, w, nb, a, y, ystride, valid); });
}

// The general int4 layout on AVX-512 VNNI: two tiles at a time, `rows` (1..PAIR_ROWS) activation rows.
void pair(const uint8_t* w, int64_t next, int64_t nb, const Quantized* a, int rows, float* y, int64_t ystride,
          int valid) {
#if defined(__x86_64__)
  switch (rows) {
    case 1: return pair_vnni<1>(w, next, nb, a, y, ystride, valid);
    case 2: return pair_vnni<2>(w, next, nb, a, y, ystride, valid);
    case 3: return pair_vnni<3>(w, next, nb, a, y, ystride, valid);
    case 4: return pair_vnni<4>(w, next, nb, a, y, ystride, valid);
    case 5: return pair_vnni<5>(w, next, nb, a, y, ystride, valid);
    default: return pair_vnni<PAIR_ROWS>(w, next, nb, a, y, ystride, valid);
  }
#endif
}

// Row o's levels lb (one per byte) into a tile's block wb: nibbles, and (SIX) the 2-bit plane.
template <bool SIX>
void put_levels(uint8_t* wb, int64_t o, const uint8_t* lb) {
  for (int j = 0; j < 4; ++j) {
    for (int p = 0; p < 4; ++p) {
      wb[64 * j + 4 * o + p] = static_cast<uint8_t>((lb[4 * j + p] & 0x0F) | (lb[16 + 4 * j + p] << 4));
    }
  }
  for (int half = 0; half < (SIX ? 2 : 0); ++half) {
    const uint8_t* lh = lb + 16 * half;
    for (int p = 0; p < 4; ++p) {
      wb[Layout<SIX>::high + 64 * half + 4 * o + p] = static_cast<uint8_t>(
          (lh[p] >> 4) | ((lh[4 + p] >> 4) << 2) | ((lh[8 + p] >> 4) << 4) | ((lh[12 + p] >> 4) << 6));
    }
  }
}

// Row `row`'s levels of block b, one per byte, into lb, from (N, K) levels lp one per byte or (nibbles) two per
// byte as int4 is stored (column 2i in the low nibble, 2i + 1 the high one).
inline void row_levels(uint8_t* lb, const uint8_t* lp, int64_t row, int64_t k, int64_t b, bool nibbles) {
  const uint8_t* src = lp + (row * k + b * BLOCK) / (nibbles ? 2 : 1);
  if (nibbles) {
    for (int c = 0; c < BLOCK / 2; ++c) {
      lb[2 * c] = src[c] & 0x0F;
      lb[2 * c + 1] = src[c] >> 4;
    }
  } else {
    std::memcpy(lb, src, BLOCK);
  }
}

template <bool SIX>
at::Tensor pack_form(const at::Tensor& levels, const at::Tensor& scale, const at::Tensor& low) {
  using L = Layout<SIX>;
  const int64_t per = SIX ? 16 : 32, top = SIX ? 63 : 15;
  TORCH_CHECK(levels.dim() == 2 && levels.scalar_type() == at::kByte, "levels: (N, K) uint8");
  // int4 levels may come two per byte (the stored form: column 2i in the low nibble, 2i + 1 the high one)
  const bool nibbles = !SIX && scale.dim() == 2 && levels.size(1) * 2 == scale.size(1) * per;
  const int64_t n = levels.size(0), k = levels.size(1) * (nibbles ? 2 : 1), nb = k / BLOCK;
  const int64_t tiles = (n + TILE - 1) / TILE;
  TORCH_CHECK(k % BLOCK == 0, "K must be a multiple of 32, not ", k);
  TORCH_CHECK(scale.sizes() == low.sizes() && scale.size(0) == n && scale.size(1) == k / per,
              "scale, low: (N, K / ", per, ")");
  const auto l = levels.contiguous();
  TORCH_CHECK(nibbles || l.max().item<int64_t>() <= top, "levels above ", top);
  const auto s = scale.to(at::kFloat).contiguous(), m = low.to(at::kFloat).contiguous();
  TORCH_CHECK(s.abs().max().item<float>() < 65504.f && m.abs().max().item<float>() < 65504.f,
              "scales and lows must fit fp16");
  at::Tensor packed = at::zeros({tiles, nb, L::bytes}, at::kByte);
  const uint8_t* lp = l.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* wb = out + (t * nb + b) * L::bytes;
        uint16_t* sm = reinterpret_cast<uint16_t*>(wb + L::scales);
        for (int64_t o = 0; o < TILE && t * TILE + o < n; ++o) {
          const int64_t row = t * TILE + o;
          uint8_t lb[BLOCK];
          row_levels(lb, lp, row, k, b, nibbles);
          put_levels<SIX>(wb, o, lb);
          for (int g = 0; g < L::groups; ++g) {
            const int64_t at = row * (k / per) + b * L::groups + g;
            sm[TILE * g + o] = c10::Half(sp[at]).x;
            sm[TILE * (L::groups + g) + o] = c10::Half(mp[at]).x;
          }
        }
      }
    }
  });
  return packed;
}

// int8 levels (N, K) and fp16-range scales (N, K / 32), lows all zero -> `Eight`'s tiles, (ceil(N / 16), K / 32,
// 544) bytes.
at::Tensor pack_eight(const at::Tensor& levels, const at::Tensor& scale, const at::Tensor& low) {
  TORCH_CHECK(levels.dim() == 2 && levels.scalar_type() == at::kChar, "levels: (N, K) int8");
  const int64_t n = levels.size(0), k = levels.size(1), nb = k / BLOCK, tiles = (n + TILE - 1) / TILE;
  TORCH_CHECK(k % BLOCK == 0, "K must be a multiple of 32, not ", k);
  TORCH_CHECK(scale.sizes() == low.sizes() && scale.dim() == 2 && scale.size(0) == n && scale.size(1) == nb,
              "scale, low: (N, K / 32)");
  TORCH_CHECK(!low.any().item<bool>(), "int8 levels take no lows");
  const auto l = levels.contiguous(), s = scale.to(at::kFloat).contiguous();
  TORCH_CHECK(s.abs().max().item<float>() < 65504.f, "scales must fit fp16");
  at::Tensor packed = at::zeros({tiles, nb, Eight::bytes}, at::kByte);
  const int8_t* lp = l.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint8_t* w = out + t * nb * Eight::bytes;
      for (int64_t o = 0; o < TILE && t * TILE + o < n; ++o) {
        const int64_t row = t * TILE + o;
        for (int64_t b = 0; b < nb; ++b) {
          for (int c = 0; c < BLOCK; ++c) {
            w[b * Eight::block + 64 * (c / 4) + 4 * o + c % 4] = static_cast<uint8_t>(lp[row * k + b * BLOCK + c]);
          }
          reinterpret_cast<uint16_t*>(w + nb * Eight::block + b * Eight::scales)[o] = c10::Half(sp[row * nb + b]).x;
        }
      }
    }
  });
  return packed;
}

}  // namespace

// The sub-scaled layouts (Sub), (ceil(N / 16), K / 256, 3392 or 2368) bytes, from
//   int6 (Q6_K): levels (N, K) uint8 0..63 (the level + 32), sc (N, K / 16) int8, d (N, K / 256) fp32;
//   int4 (Q4_K): levels (N, K) 0..15 or two per byte (N, K / 2, the stored form), sc and mn (N, K / 32)
//     uint8, d and f (N, K / 256) fp32 holding fp16 values (stored as fp16).
at::Tensor pack_sub(const at::Tensor& levels, const at::Tensor& sc, const at::Tensor& d,
                    const std::optional<at::Tensor>& mn_in, const std::optional<at::Tensor>& f_in) {
  TORCH_CHECK(mn_in.has_value() == f_in.has_value(), "pack_sub: int4 takes mn and f, int6 neither");
  const bool six = !mn_in.has_value();
  TORCH_CHECK(levels.dim() == 2 && levels.scalar_type() == at::kByte, "levels: (N, K) uint8");
  const int64_t per = six ? 16 : 32;
  const bool nibbles = !six && sc.dim() == 2 && levels.size(1) * 2 == sc.size(1) * per;
  const int64_t n = levels.size(0), k = levels.size(1) * (nibbles ? 2 : 1), supers = k / (SUPER * BLOCK);
  TORCH_CHECK(k % (SUPER * BLOCK) == 0, "K must be a multiple of 256, not ", k);
  TORCH_CHECK(sc.scalar_type() == (six ? at::kChar : at::kByte) && sc.dim() == 2 && sc.size(0) == n &&
                  sc.size(1) == k / per,
              "sc: (N, K / ", per, ") ", six ? "int8" : "uint8");
  TORCH_CHECK(d.dim() == 2 && d.size(0) == n && d.size(1) == supers, "d: (N, K / 256)");
  const auto l = levels.contiguous(), s = sc.contiguous(), dd = d.to(at::kFloat).contiguous();
  const auto mn = six ? s : mn_in->contiguous(), ff = six ? dd : f_in->to(at::kFloat).contiguous();
  TORCH_CHECK(six || (mn.sizes() == s.sizes() && mn.scalar_type() == at::kByte && ff.sizes() == dd.sizes()),
              "mn: as sc, uint8; f: as d");
  TORCH_CHECK(nibbles || l.max().item<int64_t>() <= (six ? 63 : 15), "levels above ", six ? 63 : 15);
  TORCH_CHECK(six || (dd.to(at::kHalf).to(at::kFloat).equal(dd) && ff.to(at::kHalf).to(at::kFloat).equal(ff)),
              "int4: d and f must be fp16 values");
  const int64_t tiles = (n + TILE - 1) / TILE, bytes = six ? Sub<true>::bytes : Sub<false>::bytes;
  const int64_t block = six ? Sub<true>::block : Sub<false>::block;
  at::Tensor packed = at::zeros({tiles, supers, bytes}, at::kByte);
  const uint8_t *lp = l.data_ptr<uint8_t>(), *sp = reinterpret_cast<const uint8_t*>(s.data_ptr());
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(mn.data_ptr());
  const float *dp = dd.data_ptr<float>(), *fp = ff.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t b = 0; b < k / BLOCK; ++b) {
        uint8_t* super = out + (t * supers + b / SUPER) * bytes;
        uint8_t* wb = super + Sub<true>::levels + (b % SUPER) * block;  // either form's (static_assert)
        uint8_t* cb = super + Sub<true>::codes + (b % SUPER) * 2 * TILE;  // likewise
        for (int64_t o = 0; o < TILE && t * TILE + o < n; ++o) {
          const int64_t row = t * TILE + o, factor = row * supers + b / SUPER;
          if (six) {
            const int64_t at = row * (k / 16) + 2 * b;
            put_levels<true>(wb, o, lp + row * k + b * BLOCK);
            cb[o] = sp[at], cb[TILE + o] = sp[at + 1];
            reinterpret_cast<float*>(super)[o] = dp[factor];
          } else {
            uint8_t lb[BLOCK];
            row_levels(lb, lp, row, k, b, nibbles);
            put_levels<false>(wb, o, lb);
            cb[o] = sp[row * (k / 32) + b], cb[TILE + o] = mp[row * (k / 32) + b];
            uint16_t* halves = reinterpret_cast<uint16_t*>(super);
            halves[o] = c10::Half(dp[factor]).x, halves[TILE + o] = c10::Half(fp[factor]).x;
          }
        }
      }
    }
  });
  return packed;
}

// The instruction sets this CPU runs, from the least: "portable", then "avx2", "avxvnni", "avx512vnni".
std::vector<std::string> isas() {
  std::vector<std::string> out = {"portable"};
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    out.push_back("avx2");
    if (__builtin_cpu_supports("avxvnni")) out.push_back("avxvnni");
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
      out.push_back("avx512vnni");
    }
  }
#endif
  return out;
}

// bits 4: levels (N, K) uint8 0..15, or (N, K / 2) two per byte (the stored form), scale and low
// (N, K / 32); bits 6: levels 0..63, scale and low (N, K / 16); bits 8: levels int8, scale (N, K / 32), low
// zeros; fp32 -> the packed layout, (ceil(N / 16), K / 32, 320, 512 or 544) bytes.
at::Tensor pack(const at::Tensor& levels, const at::Tensor& scale, const at::Tensor& low, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "bits: 4, 6 or 8");
  if (bits == 8) return pack_eight(levels, scale, low);
  return bits == 6 ? pack_form<true>(levels, scale, low) : pack_form<false>(levels, scale, low);
}

// Integers per activation row beside its floats: low6 (2 x nb int32), shift (nb int32), then bsum (nb int16).
inline int64_t int_words(int64_t nb) { return 3 * nb + (nb + 1) / 2; }

// Rows of x (rows, k) quantized per `group` columns into q (rows, k), their float sums (rows, 4, nb: d, dsum,
// dhalf twice) and integer ones (rows, int_words); with `rest`, what the rounding lost into rest (rows, k).
void quantize_rows(Isa isa, const float* x, int64_t rows, int64_t k, int64_t group, int8_t* q, float* floats,
                   int32_t* ints, float* rest) {
  const int64_t nb = k / BLOCK;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = floats + r * 4 * nb;
      int32_t* whole = ints + r * int_words(nb);
      const Sums out{row, row + nb, row + 2 * nb, reinterpret_cast<int16_t*>(whole + 3 * nb), whole, whole + 2 * nb};
      float* lost = rest ? rest + r * k : nullptr;
#if defined(__x86_64__)
      if (isa == Isa::avx512vnni) {
        quantize_row_512(x + r * k, k, group, q + r * k, out, lost);
        continue;
      }
      if (isa != Isa::portable) {
        quantize_row_avx2(x + r * k, k, group, q + r * k, out, lost);
        continue;
      }
#endif
      quantize_row(x + r * k, k, group, q + r * k, out, lost);
    }
  });
}

// x (M, K) @ W.T for W (n, K) in a packed layout -> (M, n) fp32. With `precise`, the rounding of the
// activations to int8 is multiplied in a second pass (x = q * d + rest, rest rounded the same way, as M
// more rows): about 15 bits of each activation, for the price of a second activation row per weight read.
at::Tensor matmul(const at::Tensor& x_in, const at::Tensor& packed, int64_t n, const std::string& isa_name,
                  bool precise) {
  TORCH_CHECK(x_in.dim() == 2, "x: (M, K)");
  const int64_t unit = packed.dim() == 3 ? packed.size(2) : 0;
  const bool sub = unit == Sub<true>::bytes || unit == Sub<false>::bytes;
  const bool six = unit == Sub<true>::bytes || unit == Layout<true>::bytes, eight = unit == Eight::bytes;
  const bool general = unit == Layout<true>::bytes || unit == Layout<false>::bytes || eight;
  TORCH_CHECK(packed.scalar_type() == at::kByte && (sub || general),
              "packed: (tiles, blocks, 320, 512 or 544) or (tiles, super-blocks, 3392 or 2368) uint8");
  const Isa isa = parse(isa_name);
  const auto x = x_in.to(at::kFloat).contiguous();
  const int64_t m = x.size(0), k = x.size(1), nb = k / BLOCK, tiles = packed.size(0);
  const int64_t per = sub ? SUPER * BLOCK : BLOCK;  // columns of one packed unit
  TORCH_CHECK(packed.size(1) * per == k && k % BLOCK == 0, "x has ", k, " columns; the weight ", packed.size(1) * per);
  TORCH_CHECK(n > (tiles - 1) * TILE && n <= tiles * TILE, "n does not match the packed tiles");
  const int64_t rows = precise ? 2 * m : m;
  const int64_t group = sub ? SUPER * BLOCK : BLOCK;  // the K-quants' activations: one scale per super-block
  auto q = at::empty({rows, k}, at::kChar);
  auto scales = at::empty({rows, 4, nb}, at::kFloat);
  auto sums = at::empty({rows, int_words(nb)}, at::kInt);
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* dp = scales.data_ptr<float>();
  int32_t* ip = sums.data_ptr<int32_t>();
  if (precise) {
    auto rest = at::empty({m, k}, at::kFloat);
    quantize_rows(isa, xp, m, k, group, qp, dp, ip, rest.data_ptr<float>());
    quantize_rows(isa, rest.data_ptr<float>(), m, k, group, qp + m * k, dp + m * 4 * nb, ip + m * int_words(nb),
                  nullptr);
  } else {
    quantize_rows(isa, xp, m, k, group, qp, dp, ip, nullptr);
  }
  auto y = at::empty({rows, n}, at::kFloat);
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const int64_t tile_bytes = packed.size(1) * packed.size(2);
  // threads split units of output rows: one tile, or two adjacent tiles where the two-tile kernel runs
  const bool pairs = !six && !sub && !eight && isa == Isa::avx512vnni && rows > ROWS_PER_PASS;
  at::parallel_for(0, pairs ? (tiles + 1) / 2 : tiles, 1, [&](int64_t u0, int64_t u1) {
    Quantized a[ROWS_PER_PASS];
    for (int64_t c = 0; c < rows; c += ROW_CHUNK) {
      const int64_t c1 = std::min(rows, c + ROW_CHUNK);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t t = pairs ? 2 * u : u;
        const bool two = pairs && t + 1 < tiles;
        const int valid = static_cast<int>(std::min<int64_t>((two ? 2 : 1) * TILE, n - t * TILE));
        const int per_pass = two ? PAIR_ROWS : ROWS_PER_PASS;
        for (int64_t r = c; r < c1; r += per_pass) {
          const int count = static_cast<int>(std::min<int64_t>(per_pass, c1 - r));
          for (int i = 0; i < count; ++i) {
            const float* row = dp + (r + i) * 4 * nb;
            const int32_t* whole = ip + (r + i) * int_words(nb);
            a[i] = {qp + (r + i) * k, row,   row + nb, row + 2 * nb, reinterpret_cast<const int16_t*>(whole + 3 * nb),
                    whole,            whole + 2 * nb};
          }
          float* out = yp + r * n + t * TILE;
          if (two) {
            pair(wp + t * tile_bytes, tile_bytes, nb, a, count, out, n, valid);
          } else if (eight) {
            tile8(isa, wp + t * tile_bytes, nb, a, count, out, n, valid);
          } else if (sub && six) {
            tile<true, true>(isa, wp + t * tile_bytes, nb, a, count, out, n, valid);
          } else if (sub) {
            tile<false, true>(isa, wp + t * tile_bytes, nb, a, count, out, n, valid);
          } else if (six) {
            tile<true>(isa, wp + t * tile_bytes, nb, a, count, out, n, valid);
          } else {
            tile<false>(isa, wp + t * tile_bytes, nb, a, count, out, n, valid);
          }
        }
      }
    }
  });
  return precise ? y.narrow(0, 0, m) + y.narrow(0, m, m) : y;
}

TORCH_LIBRARY(nlg, m) {
  m.def("isas() -> str[]", &isas);
  m.def("pack(Tensor levels, Tensor scale, Tensor low, int bits) -> Tensor");
  m.def("pack_sub(Tensor levels, Tensor sc, Tensor d, Tensor? mn=None, Tensor? f=None) -> Tensor");
  m.def("matmul(Tensor x, Tensor packed, int n, str isa, bool precise=False) -> Tensor");
}

// CPU kernels only: shapes for tracing (torch.compile) come from `model.kernels` (register_fake).
TORCH_LIBRARY_IMPL(nlg, CPU, m) {
  m.impl("pack", &pack);
  m.impl("pack_sub", &pack_sub);
  m.impl("matmul", &matmul);
}
