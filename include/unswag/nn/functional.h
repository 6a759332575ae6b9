// The memory-lean building blocks of UnSwag's transformer layers, each a
// differentiable op that keeps less for backward than plain autograd:
//
//   rms_norm                   keeps the input and the fp32 1/rms per row (not
//                              the fp32 copies autograd keeps), output equal to
//                              transformers' LlamaRMSNorm / GemmaRMSNorm
//   chunked_attention          causal (optionally sliding-window) attention
//                              with GQA, computed in query chunks; keeps q, k,
//                              v, the output and the log-sum-exp per row (no
//                              T x T matrix), recomputes scores in backward
//   linear_cross_entropy       mean cross-entropy of (h W^T) against targets,
//                              in token chunks: keeps h and one fp32
//                              log-sum-exp per token, never the [N, vocab]
//                              logits; backward recomputes each chunk
//   rotary_embedding           RoPE in one pass each way on the token-major
//                              [B, T, H, D] layout the projections produce (no
//                              transposed copies), bit-identical to
//                              transformers' x * cos + rotate_half(x) * sin
//   qkv_projection             the q, k and v projections of one input, whose
//                              backward sums grad x inside the GEMMs (no
//                              [N, hidden] add kernels, no extra buffers)
//
// All are also registered as torch.ops.unswag.<name>.
#pragma once

#include <ATen/ATen.h>

namespace unswag {

// x [..., n], weight [n]. add_one: y = x/rms * (1 + w) computed in fp32 then
// cast (Gemma); else y = w * (x/rms cast to x's dtype) (Llama).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool add_one = false);

// q [B, H, T, D], k and v [B, Hkv, T, D] with H a multiple of Hkv. Causal; with
// window > 0 token i sees tokens j in (i - window, i] only (Mistral's sliding
// window). scale: usually D^-1/2. Softmax statistics in fp32. key_bias
// (optional, floating [B, T], no gradient) is added to every score of key j: a
// large negative value removes key j (a row whose keys are all removed so
// averages their values uniformly, as any additive mask does).
at::Tensor chunked_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                             int64_t window = 0, int64_t chunk = 1024,
                             const std::optional<at::Tensor>& key_bias = std::nullopt);

// h [N, d], weight [V, d], targets [N] int64 (ignore_index ignored). Mean over
// the non-ignored targets (NaN when there are none, as torch's cross_entropy).
// The logits of a chunk are computed in h's dtype and upcast to fp32 (as
// transformers does); chunk_tokens 0 picks ~2^28 / V.
at::Tensor linear_cross_entropy(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& targets,
                                int64_t chunk_tokens = 0, int64_t ignore_index = -100);

// x [B, T, H, D] (token-major, as q_proj(x).view(B, T, H, D)), cos and sin
// [B or 1, T, D] or [B or 1, 1, T, D] in x's dtype (constants: no gradient flows
// to them). Returns contiguous [B, T, H, D]: x * cos + rotate_half(x) * sin with
// rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]), each product and the sum
// rounded as ATen rounds that composition. Backward applies the transposed
// rotation in one pass.
at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// (x W_q^T + b_q, x W_k^T + b_k, x W_v^T + b_v): x [..., n], each W [out_i, n],
// each b (optional) [out_i]. Forward equals three at::linear calls; backward
// computes grad x = dq W_q + dk W_k + dv W_v with the last two accumulated in
// place by addmm_ (one rounding per GEMM in the output dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_projection(const at::Tensor& x, const at::Tensor& wq,
                                                              const at::Tensor& wk, const at::Tensor& wv,
                                                              const std::optional<at::Tensor>& bq = std::nullopt,
                                                              const std::optional<at::Tensor>& bk = std::nullopt,
                                                              const std::optional<at::Tensor>& bv = std::nullopt);

}  // namespace unswag
