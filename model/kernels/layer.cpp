// A whole decoder block of the Llama family for rows of a few query tokens (op nlg::block): the ops of
// matmul.cpp (or, fp32, dense.cpp) and step.cpp called one after the other from C++, without going back to
// Python between them.
//
//   h, s = add_rms_norm(x, residual)            (rms_norm(x), x at the first block)
//   qkv = h @ Wqkv (+ bias); q, k = rope(q, k)   the new keys and values written at their positions
//   a = attention(q, keys, values)               h, s = add_rms_norm(a @ Wo, s)
//   x = silu_mul(h @ Wgate_up) @ Wdown           returns (x, s), the next block's input and residual
//
// The same kernels in the same order as the block's modules call them (`model.llama.Block`), so the bits
// are the same; what goes is the interpreter and the torch ops between them (views, slices, the cache's
// index_copy_, the bias add): ~60 calls a block.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

// matmul.cpp and step.cpp
at::Tensor matmul(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::string& isa, bool precise);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, const std::string& isa);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w,
                                                double eps, const std::string& isa);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                            double scale, const std::string& isa);
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const std::string& isa);
at::Tensor silu_mul(const at::Tensor& x, const std::string& isa);
at::Tensor dense(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::string& isa);  // dense.cpp

// One matmul of the block: a quantized weight packed for `matmul` (bytes), or an fp32 one for `dense`.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const std::string& isa, bool precise) {
  return w.scalar_type() == at::kFloat ? dense(x, w, n, isa) : matmul(x, w, n, isa, precise);
}

// x (B, T, hidden) fp32; residual as x, or None at the first block; weights: qkv (one, or its row blocks in
// their own forms, side by side), o, gate_up, down packed for `matmul` or (fp32) `dense`, `outs` their output
// rows, `precise` (0/1) each one's activation mode; the new keys and values
// written to rows `where` (B x T x Hkv, in (row, token, head) order) of the layer's caches seen as (rows, D),
// as `model.kv_cache.attend` writes them; then read from `keys`, `values` (B, Hkv, S, D): views of those
// caches (each row's home region), query t of row b up to key lengths[b, t].
std::tuple<at::Tensor, at::Tensor> block(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                         const at::Tensor& norm1, const at::Tensor& norm2, double eps,
                                         at::TensorList weights, at::IntArrayRef outs, at::IntArrayRef precise,
                                         const std::optional<at::Tensor>& bias, int64_t heads, const at::Tensor& cos,
                                         const at::Tensor& sin, const at::Tensor& key_cache,
                                         const at::Tensor& value_cache, const at::Tensor& where_in,
                                         const at::Tensor& keys, const at::Tensor& values, const at::Tensor& lengths,
                                         double scale, const std::string& isa) {
  const int64_t parts = static_cast<int64_t>(weights.size()) - 3;  // of the qkv projection
  TORCH_CHECK(x.dim() == 3 && parts >= 1 && outs.size() == weights.size() && precise.size() == weights.size(),
              "block: x (B, T, hidden), the qkv projection's weights then three");
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes(), "block: keys, values (B, Hkv, S, D)");
  const int64_t b = x.size(0), t = x.size(1), hidden = x.size(2), kv = keys.size(1), d = keys.size(3);
  int64_t qkv_rows = 0;
  for (int64_t i = 0; i < parts; ++i) qkv_rows += outs[i];
  TORCH_CHECK(keys.size(0) == b && heads % kv == 0 && qkv_rows == (heads + 2 * kv) * d, "block: heads and qkv rows");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous() && key_cache.sizes() == value_cache.sizes() &&
                  key_cache.scalar_type() == at::kFloat && value_cache.scalar_type() == at::kFloat &&
                  key_cache.size(-1) == d,
              "block: key and value caches contiguous fp32, (..., D)");
  const auto where = where_in.to(at::kLong).contiguous();
  TORCH_CHECK(where.numel() == b * t * kv, "block: where (B x T x Hkv)");
  const int64_t* wp = where.data_ptr<int64_t>();
  const int64_t cache_rows = key_cache.numel() / d;
  for (int64_t i = 0; i < b * t * kv; ++i) TORCH_CHECK(wp[i] >= 0 && wp[i] < cache_rows, "block: where out of the cache");

  at::Tensor h, s;
  if (residual) {
    std::tie(h, s) = add_rms_norm(x, *residual, norm1, eps, isa);
  } else {
    h = rms_norm(x, norm1, eps, isa);
    s = x;
  }
  const auto flat = h.view({b * t, hidden});
  std::vector<at::Tensor> pieces;
  for (int64_t i = 0; i < parts; ++i) pieces.push_back(linear(flat, weights[i], outs[i], isa, precise[i] != 0));
  auto qkv = parts == 1 ? pieces[0] : at::cat(pieces, 1);
  if (bias) qkv.add_(*bias);
  qkv = qkv.view({b, t, heads + 2 * kv, d});
  const auto qk = rope(qkv.narrow(2, 0, heads + kv), cos, sin, isa);  // (B, T, H + Hkv, D), contiguous
  const float *kp = qk.data_ptr<float>(), *vp = qkv.data_ptr<float>();
  float *kc = key_cache.data_ptr<float>(), *vc = value_cache.data_ptr<float>();
  for (int64_t i = 0; i < b * t; ++i) {
    for (int64_t j = 0; j < kv; ++j) {
      const int64_t to = wp[i * kv + j] * d;
      std::memcpy(kc + to, kp + (i * (heads + kv) + heads + j) * d, d * sizeof(float));
      std::memcpy(vc + to, vp + (i * (heads + 2 * kv) + heads + kv + j) * d, d * sizeof(float));
    }
  }
  const auto q = qk.narrow(2, 0, heads).view({b, t, kv, heads / kv, d});
  const auto a = decode_attention(q, keys, values, lengths, scale, isa);
  const auto o = linear(a.view({b * t, heads * d}), weights[parts], outs[parts], isa, precise[parts] != 0);
  std::tie(h, s) = add_rms_norm(o.view({b, t, hidden}), s, norm2, eps, isa);
  const int64_t g = parts + 1, down = parts + 2;
  const auto up = silu_mul(linear(h.view({b * t, hidden}), weights[g], outs[g], isa, precise[g] != 0), isa);
  const auto y = linear(up, weights[down], outs[down], isa, precise[down] != 0);
  return {y.view({b, t, hidden}), s};
}

TORCH_LIBRARY_FRAGMENT(nlg, m) {
  m.def(
      "block(Tensor x, Tensor? residual, Tensor norm1, Tensor norm2, float eps, Tensor[] weights, int[] outs, "
      "int[] precise, Tensor? bias, int heads, Tensor cos, Tensor sin, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor where, Tensor keys, Tensor values, Tensor lengths, float scale, str isa) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nlg, CPU, m) { m.impl("block", &block); }
