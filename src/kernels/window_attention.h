// Sliding-window causal attention with a per-key additive bias on raw
// pointers (no torch): the PSA layer's window read, CUDA only
// (window_attention.cu). The CPU and every shape the kernels do not take run
// the ATen composition unswag::chunked_attention (the reference the tests
// compare against).
//
// For query i and key j of one sequence (b) and head (h, reading kv head
// h / (H / Hkv)):
//   s_ij = scale q_i.k_j + bias_j        visible iff i - W < j <= i
//   o_i  = sum_j P_ij v_j,   P_ij = exp(s_ij - lse_i),   lse_i = log sum_j exp(s_ij)
// Backward (FlashAttention-2's, recomputing P from lse):
//   delta_i = do_i.o_i,  dP_ij = do_i.v_j,  dS_ij = P_ij (dP_ij - delta_i)
//   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i P_ij do_i
// No gradient flows to the bias (PSA's comes from the routes, a constant).
//
// Why a kernel of its own: FlashAttention takes no per-key bias, so the layer
// used to ride it in 8 extra head dims (136, run by the 192-dim kernel with
// 128-query tiles half outside a 128-token window). Here a block of 64
// queries reads at most ceil((W - 1) / 64) + 1 key tiles of 64 (three for W
// = 128) at D = 64 or 128, the bias is a [B, T] vector, and the backward
// runs one pass over query blocks (delta and dq) and one over key blocks (dk
// and dv, summed over the query heads sharing a kv head: deterministic, no
// atomics).
#pragma once

#include <cstdint>

#include "elementwise.h"  // DType

namespace unswag::kernels {

struct WindowAttentionParams {
  DType dtype = DType::kBFloat16;  // kFloat16 or kBFloat16: q, k, v, o and the gradients
  int64_t batch = 0, heads = 0, kv_heads = 0, time = 0, head_dim = 0;  // B, H, Hkv (divides H), T, D
  int64_t window = 0;  // W >= 1
  float scale = 1.f;
  // [B, H or Hkv, T, D] with unit stride along D; strides in elements for
  // (b, head, t), each a multiple of 8, base pointers 16-byte aligned.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {};
  const float* bias = nullptr;  // [B, T] contiguous
  // Forward output, backward input: [B, H, T, D].
  void* o = nullptr;
  int64_t o_stride[3] = {};
  float* lse = nullptr;  // [B, H, T] contiguous: log2 of sum_j 2^(s_ij log2 e), written forward
  // Backward.
  const void* dout = nullptr;  // [B, H, T, D]
  int64_t dout_stride[3] = {};
  void* dq = nullptr;  // [B, H, T, D]
  void* dk = nullptr;  // [B, Hkv, T, D]
  void* dv = nullptr;  // [B, Hkv, T, D]
  int64_t dq_stride[3] = {}, dk_stride[3] = {}, dv_stride[3] = {};
  float* delta = nullptr;  // [B, H, T] contiguous scratch
  // Optional, backward (the PSA layer's fused node): what else dq and dk take
  // before they leave, so that no pass over [B, T, heads, D] follows them.
  //  - The signal attention's packed gradients: row (b, t) of dq (dk) adds
  //    row sig_rows[b T + t] (< 0: none) of dq_sig [N, H D] (dk_sig [N, Hkv D],
  //    rows contiguous, 16-byte aligned), and dk's pass writes
  //    dz_part[(b T + t) Hkv + hk] = sum_d dk_sig[n, hk D + d] k[b, hk, t, d]
  //    (zero for rows without one): the signal gate's gradient, per kv head.
  //  - RoPE: with rope_cos/rope_sin ([B or 1, T, D] of q's dtype, contiguous;
  //    rope_per_batch: one table per sequence), q and k are taken as rotated
  //    (q = R_t q_lin) and dq, dk leave as the gradients of q_lin, k_lin:
  //    R_t^T (dq_window + dq_sig) per row, rope.h's transposed rotation
  //    (dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1) in fp32.
  const int64_t* sig_rows = nullptr;  // [B T]
  const void* dq_sig = nullptr;
  const void* dk_sig = nullptr;
  float* dz_part = nullptr;  // [B T, Hkv], needs dk_sig
  const void* rope_cos = nullptr;
  const void* rope_sin = nullptr;
  bool rope_per_batch = false;
};

// Whether the kernels take this shape: D of 64 or 128 (the layouts above are
// the caller's to check).
inline bool window_attention_cuda_head_dim(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

void window_attention_forward_cuda(const WindowAttentionParams& p, void* stream);
void window_attention_backward_cuda(const WindowAttentionParams& p, void* stream);

}  // namespace unswag::kernels
