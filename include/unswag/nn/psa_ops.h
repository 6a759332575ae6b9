// The sequence primitives of Packet-Switched Attention (docs/psa.md), each a
// differentiable op with CPU and CUDA kernels, linear in the sequence length:
//
//   causal_depthwise_conv1d   y[b,t,c] = bias[c] + sum_{j<K} w[c,j] x[b,t-K+1+j,c]
//                             (positions before 0 read zeros): every output
//                             sees only its own and the K-1 earlier tokens
//   linear_scan               h[b,t,c] = a[b,t,c] h[b,t-1,c] + x[b,t,c] with
//                             h[b,-1,c] = h0[b,c] (zeros when absent), the
//                             state carried in fp32 (bf16 recurrences drift)
//   gated_ema_scan            h[b,t,c] = (1 - z[b,t] f[c]) h[b,t-1,c] + z[b,t] f[c] v[b,t,c]:
//                             the summary register's gated moving average, the
//                             linear_scan of (1 - z f, z f v) without forming
//                             either [B, T, C] operand (fused on CUDA)
//   psa_combine               the layer's read side: gated signal attention,
//                             window, lambda-scaled local conv and summary
//                             summed into [B, T, H * D] in one pass (CUDA)
//   psa_combine_packed        the same with the signal read as packed rows
//                             and the token -> row index (the layer's packed
//                             attention output, never unpacked on CUDA)
//   gather_rows               out[m] = src[index[m]] (a zero row where index[m]
//                             is out of range), differentiable through the
//                             inverse index: packs and unpacks the signal tokens
//   pad_head_dim              [B, T, H, D] -> [B, T, H, D + pad] with a per-token
//                             value in column D and zeros after it: the
//                             window's operands with the key bias at head
//                             dims window_attention's kernels do not take
//                             (CUDA: one pass)
//   unpad_head_dim            its inverse, a view whose gradient comes back
//                             padded in one pass (the window's output)
//   gate_tokens               y[b,t,c] = g[b,t] x[b,t,c]: the local stream's
//                             write gate, one pass each way on CUDA
//   window_attention          causal attention over the last W tokens with a
//                             per-key additive bias (the window read; pruned
//                             keys carry a large negative bias): CUDA kernels
//                             of its own, chunked_attention elsewhere
//   add_rows_dot_             dst[index[m]] += src[m] in place with each
//                             row's dot product against a third tensor (no
//                             autograd; C++ only): the packed signal rows'
//                             dv added into the value streams' dv
//   psa_route                 the router's training step: Gumbel-max routes,
//                             straight-through gates, aux losses and routing
//                             statistics in two kernels forward, one backward
//   value_streams_cuda_backward  the backward of gate_tokens + the conv + the
//                             EMA scan over one v in two CUDA passes (no
//                             autograd; C++ only: the layer's fused node)
//
// All but add_rows_dot_ and value_streams_cuda_backward are also
// registered as torch.ops.unswag.<name>.
#pragma once

#include <ATen/ATen.h>

namespace unswag {

// x [B, T, C] (fp32/fp16/bf16/fp64), weight [C, K] (K >= 1), bias [C] or
// undefined; returns [B, T, C] in x's dtype. Math in fp32 (fp64 for fp64 x);
// weight and bias may have another float dtype than x (fp32 parameters with
// bf16 activations): their gradients come back in their own dtype, summed
// deterministically. Gradients flow to x, weight and bias.
at::Tensor causal_depthwise_conv1d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias = {});

// a, x [B, T, C] of one dtype, h0 [B, C] (any float dtype, e.g. an fp32
// state with bf16 a and x) or undefined; returns h [B, T, C] in x's dtype.
// Gradients flow to a, x and h0; backward keeps only a, x, h0 and recomputes h
// in fp32 (CPU and CUDA kernels: src/kernels/psa.h).
at::Tensor linear_scan(const at::Tensor& a, const at::Tensor& x, const at::Tensor& h0 = {});

// v [B, T, C] (fp32/fp16/bf16/fp64), z [B, T], rate [C] and h0 [B, C] (or
// undefined: zeros) of any float dtype. Returns h [B, T, C] in v's dtype and
// the state after the last step, [B, C] in fp32 (fp64 for fp64 v; no
// gradient): what a cache carries on. The state is carried in fp32, and the
// result equals `b = z[..., None] * rate; linear_scan(1 - b, b * v, h0)` cast
// to v's dtype (bit for bit on CUDA, where this runs fused when C % 32 == 0;
// that composition elsewhere). Gradients flow to v, z, rate and h0; the fused
// backward recomputes h and sums dz and drate from fixed-order partials.
std::tuple<at::Tensor, at::Tensor> gated_ema_scan(const at::Tensor& v, const at::Tensor& z, const at::Tensor& rate,
                                                   const at::Tensor& h0 = {});

// The PSA layer's value streams, u = gate_tokens(v, gate) (the local stream
// and the window's values), local = causal_depthwise_conv1d(u, weight) and
// summary = gated_ema_scan(v, z, rate), as one backward without autograd (for
// the layer's own autograd node, which runs the forward with those ops).
// Given du (u's gradient from its other reader, the window; or undefined),
// dlocal and dsummary (either may be undefined: zero):
//   du' = du + conv^T(dlocal),  dv = gate du' + (the scan's dv),
//   dgate = sum_c du' v,  dz and drate as gated_ema_scan's,  dweight as the conv's,
// in two CUDA passes (the conv's backward adds du; the scan's backward adds
// gate du' and sums dgate), where autograd would write dv and du in three and
// two tensors and add them. value_streams_fused says whether v qualifies (a
// CUDA build, v on CUDA, contiguous [B, T, C] fp32/fp16/bf16, C % 32 == 0);
// gate, z [B, T] and rate [C] in any float dtype, weight [C, K]. summary, if
// given, is the forward's output (like v): the scan's backward then reads
// h_{t-1} from it instead of replaying the scan (one pass fewer over v, no
// dependent chain per thread), and dz, drate read h as stored (rounded to
// v's dtype, as autograd of the ATen composition saves it).
struct ValueStreamsGrads {
  at::Tensor dv, dgate, dz, drate, dweight;  // dgate, dz, drate in fp32; dweight in weight's dtype
};
bool value_streams_fused(const at::Tensor& v);
ValueStreamsGrads value_streams_cuda_backward(const at::Tensor& v, const at::Tensor& u, const at::Tensor& gate,
                                              const at::Tensor& z, const at::Tensor& rate, const at::Tensor& weight,
                                              const at::Tensor& du, const at::Tensor& dlocal,
                                              const at::Tensor& dsummary, const at::Tensor& summary = {});

// y[b,t,h*D+d] = sig[b,h,t,d] gate[b,t] + win[b,h,t,d]
//                + lambda_local[h*D+d] local[b,t,(h/Gl)*D+d] + lambda_summary[h*D+d] summary[b,t,(h/Gs)*D+d]
// sig and win (optional) [B, H, T, D] in any layout (the attention outputs'
// transposed views); gate [B, T]; local and summary [B, T, Hx * D] with Hx
// dividing H (G = H / Hx query heads read each of their heads, as GQA's
// values); lambdas [H * D], or undefined for a read that comes scaled
// already (ones: its gradient is then dy itself, with no pass to form it,
// which is why the PSA layer folds lambda_local into the conv's taps).
// Returns [B, T, H * D] in sig's dtype; gradients flow to all seven. On CUDA
// (fp32/fp16/bf16, D % 8 == 0, H * D a multiple of 256 up to 8192, 16-byte
// aligned rows) one kernel each way computing in fp32 and rounding once;
// elsewhere the ATen composition of the formula in sig's dtype.
at::Tensor psa_combine(const at::Tensor& sig, const at::Tensor& gate, const at::Tensor& win, const at::Tensor& local,
                       const at::Tensor& lambda_local, const at::Tensor& summary, const at::Tensor& lambda_summary);

// psa_combine with the signal read packed: sig [N, H, D] holds the signal
// rows (the packed attention's output), token row r = b T + t reads sig row
// sig_rows[r] (zeros where it is out of range) and pack_rows [N] is its
// inverse (gather_rows' contract), so the result equals
// psa_combine(gather_rows(sig, sig_rows, pack_rows) as [B, H, T, D], ...).
// The CUDA kernels read the packed rows in place and write sig's gradient
// packed (zeros on rows no token reads): no full-size signal tensor either
// way. Elsewhere that composition.
at::Tensor psa_combine_packed(const at::Tensor& sig, const at::Tensor& sig_rows, const at::Tensor& pack_rows,
                              const at::Tensor& gate, const at::Tensor& win, const at::Tensor& local,
                              const at::Tensor& lambda_local, const at::Tensor& summary,
                              const at::Tensor& lambda_summary);

// src [N, C] (any dtype, rows with unit column stride or copied to it), index
// [M] and inverse [N] int64 on src's device. Returns [M, C]: row m is
// src[index[m]], or zeros where index[m] is outside [0, N). The backward is
// gather_rows(grad, inverse, index), the adjoint when inverse is index's
// inverse: every in-range index[m] distinct, inverse[index[m]] = m, and
// inverse[n] out of range for each row n that no m reads. That contract is
// the caller's (not checked: it would cost a device sync); PSA's packing
// meets it by construction. Forward and backward are one row copy each (no
// zero-filled gradient buffer, no atomics) on the CPU and CUDA.
at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& index, const at::Tensor& inverse);

// dst [N, C], src [M, C] of one dtype, index [M] int64: dst[index[m]] +=
// src[m] for every index in [0, N) (others skipped), in place, no autograd,
// and for each added row dot[index[m]] += sum_c src[m, c] other[index[m], c]
// (float32 dot [N], products and sums in fp32; other [N, C] of dst's dtype).
// The in-range indices must be distinct (not checked). The PSA layer's
// packed dv rows added into dv with the dv part of the signal gate's
// gradient (the dk part comes from the window kernels' epilogue:
// WindowGradExtras). One CUDA pass (a warp per row, no atomics) where rows
// and strides are 16-byte multiples; ATen's index_add_ elsewhere.
void add_rows_dot_(at::Tensor& dst, const at::Tensor& index, const at::Tensor& src, const at::Tensor& other,
                   at::Tensor& dot);

// x [B, T, H, D] (fp32/fp16/bf16/fp64, any strides), pad >= 1, first [B, T]
// (any float dtype) or undefined. Returns [B, T, H, D + pad] in x's dtype:
// x, then first[b, t] (rounded to x's dtype; 0 when undefined) in column D of
// every head, then zeros. Gradients flow to x (a narrowed view of the
// output's gradient) and first (summed over heads). One CUDA kernel where
// rows, strides and pad are multiples of 16 bytes; the ATen zeros + cat
// elsewhere.
at::Tensor pad_head_dim(const at::Tensor& x, int64_t pad, const at::Tensor& first = {});

// x [B, T, H, D + pad], 1 <= pad < D + pad. Returns the view x[..., :D];
// its gradient comes back as [B, T, H, D + pad] with zeros in the pad
// columns, in one CUDA pass where pad_head_dim's kernel fits (a zero fill and
// a strided copy otherwise, as narrow's).
at::Tensor unpad_head_dim(const at::Tensor& x, int64_t pad);

// x [B, T, C] (fp32/fp16/bf16/fp64), g [B, T] of any float dtype. Returns
// g[b, t] x[b, t, c] in x's dtype; gradients flow to x (g dy) and g
// (sum_c dy x, summed in fp32). On CUDA (fp32/fp16/bf16, contiguous x, C % 8
// == 0) one kernel each way; elsewhere x * g[..., None] in x's dtype.
at::Tensor gate_tokens(const at::Tensor& x, const at::Tensor& g);

// q [B, H, T, D], k and v [B, Hkv, T, D] (Hkv dividing H: GQA), bias [B, T]
// (any float dtype, no gradient), window W >= 1. Returns [B, H, T, D]:
// o_i = sum_j softmax_j(scale q_i.k_j + bias_j) v_j over keys i - W < j <= i.
// Gradients flow to q, k and v. On CUDA in fp16/bf16 with D of 64 or 128 and
// rows of unit stride along D (strides multiples of 8, 16-byte aligned) the
// kernels of src/kernels/window_attention.h, FlashAttention-2's scheme with
// the bias as a vector (the output and gradients token-major: [B, T, heads,
// D] storage); elsewhere chunked_attention(q, k, v, scale, W, 1024, bias).
at::Tensor window_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                            double scale, int64_t window);
// Whether window_attention runs its CUDA kernels for these operands.
bool window_attention_fused(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
// Its two halves without autograd (for callers that fuse it into a larger
// autograd node, as the PSA layer does): operands window_attention_fused
// takes and a contiguous fp32 bias. Forward returns (o, lse), o token-major,
// lse [B, H, T] fp32 (log2 of the softmax denominators of the base-2 scores);
// backward returns (dq, dk, dv), token-major.
std::tuple<at::Tensor, at::Tensor> window_attention_cuda_forward(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& bias,
                                                                 double scale, int64_t window);
// What else the backward's dq and dk may take before they leave (all
// optional; kernels::WindowAttentionParams has the math): the signal
// attention's packed gradients dq_sig [N, H D] and dk_sig [N, Hkv D] (rows
// contiguous, q's dtype) added at the rows of sig_rows [B T] (int64, the
// packed row of token (b, t) or -1), with dz_part [B T, Hkv] = the dot of
// each added dk_sig row with k, per kv head (only when dk_sig is given); and
// RoPE's cos, sin ([B or 1, T, D] or [B or 1, 1, T, D], q's dtype): q and k
// are the rotated ones and dq, dk come back as the pre-RoPE gradients.
struct WindowGradExtras {
  at::Tensor sig_rows, dq_sig, dk_sig;
  at::Tensor rope_cos, rope_sin;
};
std::tuple<at::Tensor, at::Tensor, at::Tensor> window_attention_cuda_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
    const at::Tensor& out, const at::Tensor& lse, double scale, int64_t window);
// With extras: (dq, dk, dv, dz_part), dz_part undefined without dk_sig.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_cuda_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
    const at::Tensor& out, const at::Tensor& lse, double scale, int64_t window, const WindowGradExtras& extras);

// The router's training step (the math: src/kernels/psa_route.h). logits
// [B, T, 4] and gumbel [B, T, 4] of one dtype, fp32 or fp64 (the
// accumulation type), bias and target [4] (any float dtype, no gradient),
// temperature > 0, the aux loss weights >= 0. Returns
//   route      [B, T] int64: argmax((logits + bias) / temperature + gumbel)
//   gates      [B, T, 4]: one_hot(route) in value, the gradient of
//              softmax((logits + bias) / temperature + gumbel) (straight-through)
//   losses     [4]: aux = w_load load + w_z z + w_entropy entropy, load, z, entropy
//   stats      [13]: agreement of route with argmax(logits + bias), the latter's
//              fractions [4], the route fractions [4], mean softmax((logits + bias) / temperature) [4]
//   signal_max [] int64: the largest per-row count of route 3 (signal)
// Gradients flow to logits from gates and losses; the rest carry none. One
// pass each way on either device; B T must be > 0.
struct PsaRoute {
  at::Tensor route, gates, losses, stats, signal_max;
};
PsaRoute psa_route(const at::Tensor& logits, const at::Tensor& bias, const at::Tensor& gumbel,
                   const at::Tensor& target, double temperature, double load_weight, double z_weight,
                   double entropy_weight);

}  // namespace unswag
