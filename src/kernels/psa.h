// The sequence primitives of Packet-Switched Attention on raw pointers (no
// torch): a causal depthwise conv1d and a first-order linear recurrence (also
// in its gated-EMA form), each forward and backward, with a CPU reference
// (psa_cpu.cpp) and CUDA kernels (psa.cu) computing the same thing, layout
// [B, T, C] contiguous; and, CUDA only (psa_combine.cu), the layer's read-side
// sum psa_combine, plus the router's counter-based Gumbel noise and the row
// gather that packs the signal tokens (both devices), the window's head-dim
// padding and the per-token gate of the local stream (CUDA).
// Storage dtype T (fp32/fp16/bf16/fp64) for the big tensors; the math, the
// small parameters (conv weight and bias, h0) and their gradients are in the
// accumulation type A: double for kFloat64, float otherwise.
//
// causal_conv (K taps, weight [C, K]):
//   y[b,t,c]  = bias[c] + sum_{j<K} w[c,j] x[b,t-K+1+j,c]        (x[<0] = 0)
//   dx[b,t,c] = sum_{j<K} w[c,j] dy[b,t+K-1-j,c]                 (dy[>=T] = 0)
//   dw[c,j]   = sum_{b,t} dy[b,t,c] x[b,t-K+1+j,c],   dbias[c] = sum_{b,t} dy[b,t,c]
// The time axis is cut into tiles of `time_tile` steps; a group is one
// (b, tile) pair. dw and dbias are written as per-group partial sums (layout
// [groups, K, C] and [groups, C], coalesced over c on the GPU) that the caller
// reduces: deterministic, no atomics.
//
// linear_scan:
//   h[b,t,c] = a[b,t,c] h[b,t-1,c] + x[b,t,c],   h[b,-1,c] = h0[b,c] (or 0)
// backward, with dh the gradient of h and g the gradient of the state:
//   g_t = dh_t + a_{t+1} g_{t+1} (g_T = 0),  dx_t = g_t,  da_t = g_t h_{t-1},
//   dh0 = a_0 g_0.
// The backward takes a, x, h0 (not h): it recomputes h in A, so nothing of size
// T*C in fp32 is kept between forward and backward, and a bf16 h is never fed
// back into the recurrence.
#pragma once

#include <cstdint>

#include "activation_math.h"  // UNSWAG_HD
#include "elementwise.h"      // DType

namespace unswag::kernels {

// ---- causal depthwise conv1d ----------------------------------------------

struct CausalConvParams {
  DType dtype = DType::kFloat32;  // of x, y, dy, dx
  int64_t batch = 0, time = 0, channels = 0, taps = 0;  // B, T, C, K (K >= 1)
  int64_t time_tile = 256;        // steps per group (conv_time_tile)
  const void* x = nullptr;        // [B, T, C]
  const void* weight = nullptr;   // [C, K] in A
  const void* bias = nullptr;     // [C] in A, or null
  void* y = nullptr;              // forward: [B, T, C]
  const void* dy = nullptr;       // backward: [B, T, C]
  void* dx = nullptr;             // backward: [B, T, C], or null (not wanted)
  const void* dx_addend = nullptr;  // backward: [B, T, C] added to dx (another tensor), or null
  void* dweight_partial = nullptr;  // backward: [conv_groups, K, C] in A, or null
  void* dbias_partial = nullptr;    // backward: [conv_groups, C] in A, or null
};

// Tile length: on the CPU a fixed 256 steps (coarse work items for
// at::parallel_for); on the GPU the longest power of two in [64, 1024] that
// still gives >= 2^18 threads (one per (b, tile, c)), since each thread walks
// its tile sequentially and re-reads K-1 halo steps, which longer tiles amortise.
inline int64_t conv_time_tile(int64_t batch, int64_t time, int64_t channels, bool cuda) {
  if (!cuda) return 256;
  int64_t tile = 1024;
  while (tile > 64 && batch * ((time + tile - 1) / tile) * channels < (int64_t(1) << 18)) tile /= 2;
  return tile;
}
inline int64_t conv_groups(const CausalConvParams& p) {
  return p.batch * ((p.time + p.time_tile - 1) / p.time_tile);
}

// CPU: groups [g0, g1) of conv_groups(p).
void causal_conv_forward_cpu(const CausalConvParams& p, int64_t g0, int64_t g1);
void causal_conv_backward_cpu(const CausalConvParams& p, int64_t g0, int64_t g1);

// ---- linear scan ------------------------------------------------------------

// The GPU splits T into chunks of kScanChunk steps (kScanSub sub-chunks of
// kScanSubLen: the backward holds one sub-chunk of h in registers).
constexpr int64_t kScanSubLen = 16;
constexpr int64_t kScanSub = 16;
constexpr int64_t kScanChunk = kScanSubLen * kScanSub;
// The CPU works on blocks of this many channels of one batch row.
constexpr int64_t kScanCpuChannels = 32;

struct LinearScanParams {
  DType dtype = DType::kFloat32;  // of a, x, h, dh, da, dx
  int64_t batch = 0, time = 0, channels = 0;  // B, T, C
  const void* a = nullptr;   // [B, T, C]
  const void* x = nullptr;   // [B, T, C]
  const void* h0 = nullptr;  // [B, C] in A, or null (zeros)
  void* h = nullptr;         // forward: [B, T, C]
  const void* dh = nullptr;  // backward: [B, T, C]
  void* da = nullptr;        // backward: [B, T, C], or null
  void* dx = nullptr;        // backward: [B, T, C], or null
  void* dh0 = nullptr;       // backward: [B, C] in A, or null
  void* workspace = nullptr;  // CUDA only: scan_cuda_workspace_elems(p, backward) elements of A
  // Gated EMA form (CUDA only, channels % 32 == 0; z non-null selects it):
  // a = 1 - z[b,t] f[c] and x = z[b,t] f[c] v[b,t,c] are formed on the fly
  // (v = the `x` pointer, `a` unused), as ATen rounds `b = z * f; 1 - b, b * v`.
  // Backward writes dv = b g into `dx` (da unused) and the partial sums
  // dz_partial [B, T, C / 32] (summed: dz = sum_c f_c g_t (v_t - h_{t-1})) and
  // df_partial [B, chunks, C] (summed: df = sum_t z_t g_t (v_t - h_{t-1})).
  const void* z = nullptr;   // [B, T] in A
  const void* f = nullptr;   // [C] in A
  void* last = nullptr;      // CUDA forward, either form: h at t = T - 1 [B, C] in A, or null (the CPU ignores it)
  void* dz_partial = nullptr;
  void* df_partial = nullptr;
  // EMA backward, optional (CUDA only): v also feeds u = g[b,t] v (the PSA
  // layer's local stream) whose gradient du [B, T, C] arrives here, so one
  // pass writes the whole dv = b g_scan + g du and the partials of
  // dg = sum_c du v, dgate_partial [B, T, C / 32] (summed like dz_partial).
  const void* gate = nullptr;       // g [B, T] in A
  const void* gate_grad = nullptr;  // du [B, T, C]
  void* dgate_partial = nullptr;
  // EMA backward, optional (CUDA only): the forward's output h [B, T, C] (in
  // the storage dtype). Given it, the backward reads h_{t-1} back instead of
  // replaying the forward: one reverse walk per chunk, no checkpoint walk, v
  // read once fewer. dz and df then read h as stored (rounded to 16 bits in
  // fp16/bf16, as autograd of the ATen composition would save it); dv does not
  // depend on h.
  const void* h_saved = nullptr;
};

inline int64_t scan_chunks(int64_t time) { return (time + kScanChunk - 1) / kScanChunk; }
inline int64_t scan_cuda_workspace_elems(const LinearScanParams& p, bool backward) {
  return (backward ? 4 : 2) * p.batch * scan_chunks(p.time) * p.channels;
}
inline int64_t scan_cpu_groups(const LinearScanParams& p) {
  return p.batch * ((p.channels + kScanCpuChannels - 1) / kScanCpuChannels);
}

// CPU: groups [g0, g1) of scan_cpu_groups(p) (one batch row, kScanCpuChannels channels each).
void linear_scan_forward_cpu(const LinearScanParams& p, int64_t g0, int64_t g1);
void linear_scan_backward_cpu(const LinearScanParams& p, int64_t g0, int64_t g1);

// ---- psa_combine (CUDA only; elsewhere its ATen composition) -----------------

// The layer's read side, C = heads * head_dim, per row r = (b, t):
//   y[b,t,c] = sig[b,h,t,d] gate[b,t] + win[b,h,t,d]
//              + lambda_local[c] local[b,t,c_l] + lambda_summary[c] summary[b,t,c_s]
// with c = h D + d and c_l = (h / local_group) D + d (c_s likewise): a local or
// summary head serves `group` consecutive query heads, as GQA's values do.
// sig and win are [B, H, T, D] with d contiguous (any other strides, multiples
// of 8 elements); local, summary, y and dy contiguous. The gate and lambdas are
// fp32. Needs head_dim % 8 == 0 and heads * head_dim a multiple of 256, at
// most 8192 (one thread per 8 columns, whole warps); 16-byte aligned data.
// Backward: dsig [B, H, T, D] with its own strides (dsig_stride) = dy gate; dgate[b,t] = sum_c dy sig;
// dlocal = dy lambda_local, written [B, T, C / local_group] when local_group
// is 1, else per query column [B, T, C] (the caller sums each group's heads);
// dsummary likewise; dlambda_partial [blocks, 2, C] (fp32; summed over blocks:
// d lambda_local, then d lambda_summary). Any of dsig, dgate, dlocal and
// dsummary may be null. A null lambda is all ones (the read comes scaled):
// its read is added as it is, its gradient is dy (not written: dlocal or
// dsummary is then ignored) and its partial sums are zero.
constexpr int64_t kCombineRows = 64;
struct PsaCombineParams {
  DType dtype = DType::kFloat32;  // of sig, win, local, summary, y, dy, dsig, dlocal, dsummary
  int64_t batch = 0, time = 0, heads = 0, head_dim = 0;
  int64_t local_group = 1, summary_group = 1;
  const void* sig = nullptr;
  int64_t sig_stride[3] = {0, 0, 0};  // of b, h, t (elements)
  // Or packed: sig (and dsig) are [N, C] rows and row r = (b, t) reads row
  // sig_rows[r] (< 0: zeros; dsig's row is then not written).
  const int64_t* sig_rows = nullptr;
  const float* gate = nullptr;        // [B, T]
  const void* win = nullptr;          // or null
  int64_t win_stride[3] = {0, 0, 0};
  const void* local = nullptr;
  const float* lambda_local = nullptr;  // [C]
  const void* summary = nullptr;
  const float* lambda_summary = nullptr;
  void* y = nullptr;
  const void* dy = nullptr;
  void* dsig = nullptr;
  int64_t dsig_stride[3] = {0, 0, 0};  // of b, h, t (elements; multiples of 8)
  float* dgate = nullptr;
  void* dlocal = nullptr;
  void* dsummary = nullptr;
  float* dlambda_partial = nullptr;
};
// Rows per block: kCombineRows, or fewer where that would leave under 512
// blocks (at 2k tokens 64-row blocks made 32 blocks, each walking its rows one
// after another: 0.10 ms for an 8 MiB pass, H100 profile).
UNSWAG_HD int64_t psa_combine_rows_per_block(const PsaCombineParams& p) {
  const int64_t rows_512 = (p.batch * p.time + 511) / 512;
  return rows_512 < 1 ? 1 : (rows_512 > kCombineRows ? kCombineRows : rows_512);
}
inline int64_t psa_combine_blocks(const PsaCombineParams& p) {
  const int64_t rpb = psa_combine_rows_per_block(p);
  return (p.batch * p.time + rpb - 1) / rpb;
}

// ---- row gather (packing and unpacking the signal tokens) -----------------------

// out[m, :] = src[index[m], :] for m < rows, a zero row where index[m] is
// outside [0, src_rows). Rows are row_bytes bytes (any element type); src
// rows are src_row_stride bytes apart, out is dense. The PSA layer packs the
// signal tokens of [B * T, C] into [B * S, C] with it and unpacks them back;
// the two index arrays are each other's inverse, so each direction is the
// other's adjoint (include/unswag/nn/psa_ops.h, gather_rows).
struct GatherRowsParams {
  int64_t rows = 0, src_rows = 0, row_bytes = 0, src_row_stride = 0;
  const void* src = nullptr;
  const int64_t* index = nullptr;  // [rows]
  void* out = nullptr;             // [rows, row_bytes]
};
// CPU: out rows [m0, m1).
void gather_rows_cpu(const GatherRowsParams& p, int64_t m0, int64_t m1);

// dst[index[m], :] += src[m, :] for every m whose index lies in [0, dst_rows)
// (others skipped), each sum in fp32 rounded once, and dot[index[m]] +=
// sum_c src[m, c] other[index[m], c]: the packed signal rows' dv added into
// the value streams' dv, with the signal gate's gradient. The in-range
// indices must be distinct (no atomics; the caller's contract, as
// gather_rows' inverse). CUDA only (fp32/fp16/bf16, cols and the row strides
// multiples of 16 bytes, 16-byte aligned bases; the op uses ATen's
// index_add_ elsewhere).
struct AddRowsParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, cols = 0, dst_rows = 0;
  const void* src = nullptr;  // [rows, cols], row stride src_stride (elements)
  int64_t src_stride = 0;
  const int64_t* index = nullptr;  // [rows]
  void* dst = nullptr;  // [dst_rows, cols], row stride dst_stride
  int64_t dst_stride = 0;
  // dot[n] += sum_c src[m, c] other[n, c] (fp32, summed in fp32) for n =
  // index[m]: the PSA layer's gradient of the signal gate (its dv part; the
  // dk part comes from the window kernels' epilogue). other [dst_rows, cols]
  // of src's dtype, row stride other_stride, aligned as dst.
  const void* other = nullptr;
  int64_t other_stride = 0;
  float* dot = nullptr;  // [dst_rows]
};

// ---- head-dim padding (the window attention's operands) -------------------------

// out[b,t,h,:] = (x[b,t,h,0..D), first[b,t] or 0, 0 ... 0), D + pad values:
// the window's q, k and v gain `pad` head dims (the key bias rides in them,
// nn/psa.cpp) in one pass instead of a zero fill and a cat each. x has d
// contiguous and strides of b, t, h in elements; out is dense. CUDA only
// (fp32/fp16/bf16): needs D and pad multiples of 16 bytes, x's strides and
// both base addresses 16-byte aligned (pad_head_dim_cuda_fits); the op runs
// the ATen composition elsewhere.
struct PadHeadDimParams {
  DType dtype = DType::kFloat32;
  int64_t batch = 0, time = 0, heads = 0, head_dim = 0, pad = 0;
  const void* x = nullptr;
  int64_t x_stride[3] = {0, 0, 0};  // of b, t, h (elements)
  const float* first = nullptr;     // [B, T] fp32, or null: zeros
  void* out = nullptr;              // [B, T, heads, head_dim + pad]
};

// ---- per-token gate (the local stream's write gate) ------------------------------

// y[r, c] = g[r] x[r, c]; backward dx[r, c] = g[r] dy[r, c] and
// dg[r] = sum_c dy[r, c] x[r, c] (fp32): one pass each way where autograd's
// broadcast multiply spends four (the product, its broadcast gradient, the
// gradient's product with x, and the sum). x, y, dy, dx dense [rows, cols]
// (fp32/fp16/bf16), g and dg fp32 [rows]. CUDA only: needs cols % 8 == 0 and
// 16-byte aligned rows; the op runs the ATen composition elsewhere.
struct GateTokensParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, cols = 0;
  const void* x = nullptr;
  const float* g = nullptr;
  void* y = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;   // or null
  float* dg = nullptr;  // or null
};

// ---- Gumbel noise (the router's training draw) --------------------------------

UNSWAG_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// out[i] = -log(-log(u_i)) rounded to float, u_i the top 53 bits of
// splitmix64(key ^ splitmix64(i)) / 2^53 clamped to [1e-12, 1 - 1e-12], the
// logs in double. Counter-based: no generator state, no host work, and the
// same values on the CPU and CUDA (CUDA's double log is within 1 ulp, which
// the rounding to float absorbs in all but rare ties).
struct GumbelNoiseParams {
  uint64_t key = 0;
  int64_t n = 0;
  float* out = nullptr;
};
UNSWAG_HD float gumbel_at(uint64_t key, int64_t i) {
  double u = double(splitmix64(key ^ splitmix64(uint64_t(i))) >> 11) * 0x1.0p-53;
  u = u < 1e-12 ? 1e-12 : (u > 1 - 1e-12 ? 1 - 1e-12 : u);
  return float(-log(-log(u)));
}
// CPU: elements [i0, i1).
void gumbel_noise_cpu(const GumbelNoiseParams& p, int64_t i0, int64_t i1);

#ifdef UNSWAG_WITH_CUDA
// CUDA, on `stream` (a cudaStream_t); they check the launch.
void causal_conv_forward_cuda(const CausalConvParams& p, void* stream);
void causal_conv_backward_cuda(const CausalConvParams& p, void* stream);
void linear_scan_forward_cuda(const LinearScanParams& p, void* stream);
void linear_scan_backward_cuda(const LinearScanParams& p, void* stream);
void psa_combine_forward_cuda(const PsaCombineParams& p, void* stream);
void psa_combine_backward_cuda(const PsaCombineParams& p, void* stream);
void gumbel_noise_cuda(const GumbelNoiseParams& p, void* stream);
void gather_rows_cuda(const GatherRowsParams& p, void* stream);
void add_rows_cuda(const AddRowsParams& p, void* stream);
void pad_head_dim_cuda(const PadHeadDimParams& p, void* stream);
void gate_tokens_forward_cuda(const GateTokensParams& p, void* stream);
void gate_tokens_backward_cuda(const GateTokensParams& p, void* stream);
#endif

}  // namespace unswag::kernels
