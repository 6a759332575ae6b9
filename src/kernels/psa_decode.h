// One decode step of a Packet-Switched Attention layer (batch 1, one token)
// on the GPU in five launches and no host sync (docs/psa.md, "Fused decode").
// The ATen composition in src/nn/psa.cpp (forward_cached) is the reference:
// it is what the CPU runs, and the GPU tests compare the two.
//
//   1. gemv   q, k, v and the router logits of x (one warp per output row;
//             every weight row read once, fp32 accumulation, rounded to T
//             as cuBLAS's output is).
//   2. prepare  the route r = argmax(logits + c) (first maximum, as
//             torch.argmax); RoPE on q and k; the conv over the tail and
//             the token's write u = [r != prune] v (tail shifted in place);
//             the summary s = a s + (1 - a) v with a = 1 - [r == summary]
//             (1 - sigmoid(theta)); the window ring's slot tokens % W; the
//             signal K/V at index n (the device counter) if r == signal.
//   3. attend  grid (H, 1 + splits): split 0 the window (W slots, pruned
//             ones skipped: their weight e^-2000 is 0 in the reference
//             too), splits >= 1 chunks of kDecodeSplitKeys signal keys
//             (only when r == signal); one warp per key, online softmax,
//             partials (max, sum, acc[D]) in fp32.
//   4. combine  the partials (log-sum-exp merge), plus lambda_local * local
//             and lambda_summary * summary, rounded to T once; the counter
//             becomes n + [r == signal].
//   5. gemv   o_proj.
// The host launches splits for an upper bound of the signal count (it grows
// by at most one per step), so it never reads the count back; blocks past the
// true count return at once.
#pragma once

#include <cstdint>

#include "elementwise.h"  // DType

namespace unswag::kernels {

constexpr int64_t kDecodeSplitKeys = 128;  // signal keys per attention block

// Attention blocks per head for a signal count of at most `bound` keys
// (the new token's included): 1 (the window) + ceil(bound / kDecodeSplitKeys).
inline int64_t psa_decode_splits(int64_t bound) { return 1 + (bound + kDecodeSplitKeys - 1) / kDecodeSplitKeys; }

struct PSADecodeParams {
  DType dtype = DType::kBFloat16;  // of x, the weights, the PSA parameters, the caches (fp32/fp16/bf16)
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0;  // d, H, Hkv, D (D even, <= 256)
  int64_t kernel_size = 1, window = 0;                        // Kc, W (0: no window)
  int64_t tokens = 0;                                         // tokens already cached: the new token's index
  double scale = 1.0;                                         // D^-1/2

  const void* x = nullptr;  // [d]
  // Weights [out, in] row-major; biases [out] or null.
  const void *wq = nullptr, *bq = nullptr, *wk = nullptr, *bk = nullptr, *wv = nullptr, *bv = nullptr;
  const void *wr = nullptr, *br = nullptr;  // router [4, d], [4]
  const void *wo = nullptr, *bo = nullptr;  // [d, H D], [d]
  const void *cos = nullptr, *sin = nullptr;  // [D] at the token's position
  const void* route_bias = nullptr;           // c [4]
  const void* conv_weight = nullptr;          // [kv_dim, Kc]
  const void* summary_decay = nullptr;        // theta [kv_dim]
  const void *lambda_local = nullptr, *lambda_summary = nullptr;  // [H D]

  // State, updated in place.
  void* conv_tail = nullptr;  // [Kc - 1, kv_dim] (null when Kc == 1)
  float* summary = nullptr;   // [kv_dim]
  void *ring_k = nullptr, *ring_v = nullptr;  // [Hkv, W, D]
  float* ring_keep = nullptr;                  // [W]: 1, or 0 where pruned or empty
  void *signal_k = nullptr, *signal_v = nullptr;  // [Hkv, capacity, D]
  int64_t signal_capacity = 0;
  int32_t* signal_count = nullptr;  // [1]
  int64_t signal_bound = 0;         // host: signal_count <= signal_bound < signal_capacity

  // Workspace: psa_decode_workspace_elems(p) elements of T, and
  // psa_decode_partial_elems(p) floats.
  void* workspace = nullptr;
  float* partials = nullptr;
  int32_t* step = nullptr;  // [2]: the route, the signal keys this step reads

  // Outputs.
  int64_t* route_out = nullptr;    // [1]
  float* fractions_out = nullptr;  // [4]: one-hot of the route
  void* y = nullptr;               // [d]
};

inline int64_t psa_decode_workspace_elems(const PSADecodeParams& p) {
  const int64_t qd = p.heads * p.head_dim, kvd = p.kv_heads * p.head_dim;
  return (qd + 2 * kvd + 4) + qd + 2 * kvd + qd;  // projections, q rotated, local + summary, attention output
}
inline int64_t psa_decode_partial_elems(const PSADecodeParams& p) {
  return p.heads * psa_decode_splits(p.signal_capacity) * (2 + p.head_dim);
}

#ifdef UNSWAG_WITH_CUDA
// On `stream` (a cudaStream_t); checks each launch.
void psa_decode_step_cuda(const PSADecodeParams& p, void* stream);
#endif

}  // namespace unswag::kernels
