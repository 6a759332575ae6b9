// Packet-Switched Attention (docs/psa.md): an attention layer with Llama's
// q/k/v/o projections in which a per-token router picks what each token
// WRITES for later tokens (0 prune: nothing; 1 local: the causal depthwise
// conv stream; 2 summary: a recurrent register, an EMA or a linear-attention
// state; 3 signal: its key and value for the
// sparse attention), while every token READS the conv, the register, a small
// causal window of the last W non-pruned tokens (if configured) and (if it is
// a signal token) causal attention over the earlier signal tokens:
//
//   o_t = Wo( z_sig,t * attn(q_t; K_sig<=t, V_sig<=t) + attn(q_t; K_win(t), V_win(t))
//             + lambda_local * c_t + lambda_summary * m_t )
//
// The signal attention gathers the signal tokens into a packed sequence, so it
// costs O(S^2) in their number S; the window O(T * W), the conv O(T * K), the
// register O(T). Cached generation (PSACache) keeps only the signal tokens'
// K/V, the last W - 1 tokens' K/V for the window, the conv tail and the
// register.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <array>
#include <cstdint>
#include <functional>
#include <string>

namespace unswag::nn {

// Route indices.
enum PSARoute : int64_t { kPrune = 0, kLocal = 1, kSummary = 2, kSignal = 3 };

// What the window attention adds to the score of a pruned token's key: its
// softmax weight becomes e^-2000 = 0 in every float type, so the token is
// removed, while the attention keeps the shape (and kernel) of a sliding window.
constexpr double kPrunedKeyBias = -2000.0;

struct PSAConfig {
  int64_t kernel_size = 8;  // Kc of the local causal conv
  // W: every token also attends to the tokens j in (t - W, t] that were not
  // pruned (0: no window). A sliding window as Mistral's: O(T * W).
  int64_t window = 128;
  // Budgets of the four routes (prune, local, summary, signal); sum to 1.
  std::array<double, 4> target_shares = {0.125, 0.375, 0.3125, 0.1875};
  double load_loss_weight = 1.0;   // alpha: sum_r (mean_t p_r - target_r)^2
  double z_loss_weight = 1e-3;     // beta: mean_t logsumexp(logits_t)^2
  // eta: mean_t H(p_t), the per-token route entropy of p = softmax((logits + c) / tau).
  // The load loss holds the *mean* p at the budgets, which a router that is equally
  // unsure for every token satisfies too; then training's drawn routes disagree with
  // eval's arg-max. Low per-token entropy with balanced mean is the "confident and
  // balanced" objective (the mutual information of token and route).
  double entropy_loss_weight = 0.02;
  double controller_gamma = 0.02;  // c_r += gamma (target_r - f_r) per update_controller()
  // The ablation: each token's route drawn i.i.d. from target_shares by a hash
  // of (seed, layer, batch row, position), in training and eval alike.
  bool random_router = false;
  // The router reads sg(x): its gradients (straight-through gates and aux
  // losses) train the router's own weights but do not reach the hidden state
  // and the layers below. Measured (docs/psa.md, "Quality"): with the
  // gradient reaching x, the aux losses and the 1/tau-scaled gate gradients
  // bend the residual stream and the learned router lost to a random one by
  // 0.12 nats; detached, it beats the random router.
  bool detach_router_input = true;
  // Experimental (docs/psa.md, "Every token reads the signal tokens"): every
  // token, not only the signal ones, reads causal attention over the earlier
  // signal tokens' keys and values. The training forward runs it as dense
  // causal attention with non-signal keys removed by kPrunedKeyBias, O(T^2):
  // it is for measuring what the read is worth, not for speed.
  bool all_tokens_read_signal = false;
  // Experimental (docs/psa.md, "One softmax over the window and the signal
  // tokens"): with a window, a query that reads the signal tokens reads them
  // and its window in one softmax over the union of the two key sets, as
  // dense attention over those keys would, instead of the sum of two
  // separately normalised reads (which counts a signal key inside the window
  // twice). With every token signal and no prune, the layer's attention is
  // then dense causal attention. Runs with an explicit [T, T] mask, O(T^2):
  // for measuring what the read is worth, not for speed.
  bool joint_softmax = false;
  // What the summary register is and how tokens read it (docs/psa.md, "Summary register"):
  //  "ema": per kv channel an exponential moving average of the summary
  //    tokens' values, s_t = a s_{t-1} + (1 - a) v_t, which every query reads
  //    alike (state kv_dim);
  //  "linear_attention": per kv head a D x (D + 1) matrix of the summary
  //    tokens' phi(k) [v, 1]^T (phi = elu + 1, pre-RoPE q and k), decayed by
  //    sigmoid(theta_h) at each summary write, which each query reads as
  //    normalised linear attention, phi(q)^T S[:, :D] / (phi(q)^T S[:, D] + 1):
  //    a content-addressed read of the whole past for every token, O(T D^2)
  //    in training, Hkv D (D + 1) floats of state.
  std::string summary = "ema";
  // The initial value of lambda_local and lambda_summary, the per-channel
  // gates of the conv and register reads (o = Wo(attention + lambda_local c +
  // lambda_summary m)). 0: a fresh layer starts as its attention reads alone
  // (with every token signal, dense attention) and training opens the cheap
  // reads as far as they help, as zero-initialised residual gates do
  // (ReZero, LayerScale). Measured on a CPU proxy (docs/psa.md, "Read gates
  // start at zero"): 1, the earlier default, cost the small LM ~0.1-0.2
  // nats, with every token signal too. config.json "lambda_init"; absent: 1,
  // what layers saved before the option were initialised with.
  double lambda_init = 0.0;
  uint64_t seed = 0;         // the Gumbel noise generator's and the random router's seed
  // tau: training routes are Gumbel-max draws from softmax(logits / tau) with
  // the straight-through gradient of softmax(logits / tau + g); annealing tau
  // (about 1 -> 0.3, by whoever trains) moves them toward eval's arg-max.
  double temperature = 1.0;

  // Throws naming the field when a value is out of range; `source` prefixes the message.
  void validate(const std::string& source = "PSAConfig") const;
};

// The last forward's routing, per layer.
struct PSARouteStats {
  std::array<double, 4> fractions{};  // hard route fractions (prune, local, summary, signal)
  // Fraction of tokens whose training-mode (noisy) choice equals the eval-mode
  // arg-max; 1 in eval mode and for the random router.
  double agreement = 1.0;
  int64_t tokens = 0;
};

// A growing [1, Hkv, capacity, D] key/value store: the capacity grows by 1/8
// when full, so appends are amortised O(1) and at most 12.5% is unfilled;
// bytes_allocated() counts the capacity (what the allocator holds), not the
// filled length.
struct KVBuffer {
  torch::Tensor k, v;  // [1, Hkv, capacity, D]
  int64_t length = 0;
  void append(const torch::Tensor& k_new, const torch::Tensor& v_new);  // [1, Hkv, n, D]
  // Grows the capacity to at least `need` slots (by 1/8 at least, as append does).
  void reserve(int64_t need, int64_t kv_heads, int64_t head_dim, const torch::TensorOptions& options);
  torch::Tensor keys() const;    // [1, Hkv, length, D] (a view)
  torch::Tensor values() const;  // [1, Hkv, length, D] (a view)
  int64_t bytes_allocated() const;
  void clear() { *this = KVBuffer(); }
};

// The generation state of one PSA layer (batch 1).
struct PSACache {
  KVBuffer signal;          // keys (RoPE at the original positions) and values of the signal tokens only
  torch::Tensor conv_tail;  // [1, Kc - 1, kv_dim]: the last Kc - 1 written local values u
  // The register, fp32 (fp64 for fp64 models): [1, kv_dim] ("ema") or the
  // matrix state [1, Hkv, D, D + 1] ("linear_attention").
  torch::Tensor summary;
  // The window's last min(W - 1, tokens) tokens: keys (RoPE applied), values
  // (zero where pruned) [1, Hkv, n, D] and the key bias [1, n] fp32 (0, or
  // kPrunedKeyBias where pruned).
  torch::Tensor window_k, window_v, window_bias;
  torch::Tensor window_signal;  // [1, n] bool: which of them are signal tokens (PSAConfig::joint_softmax only)
  int64_t tokens = 0;       // tokens seen (all routes)

  // The fused CUDA decode's state (docs/psa.md, "Fused decode"). While
  // `fused.active`, the window lives in a ring of W slots (token j at slot
  // j % W) instead of window_k/v/bias, and the signal count in a device
  // counter: signal.length is then stale (signal_tokens() reads the counter).
  // A chunk of more than one token converts the state back first.
  struct Fused {
    bool active = false;
    torch::Tensor ring_k, ring_v;  // [Hkv, W, D]
    torch::Tensor ring_keep;       // [W] fp32: 1, or 0 where pruned or empty
    torch::Tensor signal_count;    // [1] int32
    int64_t signal_bound = 0;      // an upper bound of the counter, kept on the host
    torch::Tensor workspace;       // model dtype
    torch::Tensor partials;        // fp32
    torch::Tensor step;            // [2] int32
  } fused;

  // Signal tokens held (reads the device counter back while fused.active).
  int64_t signal_tokens() const;
  int64_t bytes_allocated() const;
  void clear() { *this = PSACache(); }
};

class PacketSwitchedAttentionImpl : public torch::nn::Module {
 public:
  // Llama attention shapes: hidden d, H query heads, Hkv key/value heads of
  // head_dim D; qkv_bias (Qwen2), o_bias. layer_index keys the random router's
  // hash and the Gumbel generator's seed.
  PacketSwitchedAttentionImpl(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, bool qkv_bias,
                              bool o_bias, const PSAConfig& config, int64_t layer_index = 0);

  // x [B, T, d] (the normed hidden state), positions [B, T] int64 (the tokens'
  // original positions), cos/sin [B, 1, T, D] of RoPE at those positions in
  // x's dtype. gumbel [B, T, 4] (optional, training only): the noise to use
  // instead of drawing it. Returns [B, T, d].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& positions, const torch::Tensor& cos,
                        const torch::Tensor& sin, const torch::Tensor& gumbel = {});
  // The same in eval mode over a chunk that continues `cache` (prefill: an
  // empty cache; decode: T = 1), batch 1, no autograd; fills the cache.
  // On CUDA (fp32/fp16/bf16, learned router, head_dim <= 256) a one-token
  // chunk takes the fused decode step (five kernels, no host sync; docs/psa.md)
  // unless set_fused_decode(false); everything else is the ATen composition.
  torch::Tensor forward_cached(const torch::Tensor& x, const torch::Tensor& positions, const torch::Tensor& cos,
                               const torch::Tensor& sin, PSACache& cache);
  void set_fused_decode(bool on) { fused_decode_ = on; }
  bool fused_decode() const { return fused_decode_; }
  // Training on CUDA runs the local and summary streams, the window read and
  // the signal tokens' packing as one autograd node (no full-size gradient
  // sums; window_streams_and_signal) unless set_fused_window_pack(false): a
  // node per op, the composition it fuses.
  void set_fused_window_pack(bool on) { fused_window_pack_ = on; }

  // The parameters PSA adds over Llama attention, initialised as docs/psa.md
  // says (router N(0, 0.02) with bias log(targets), conv 1/Kc, decays spread
  // over 0.9..0.999, lambdas lambda_init, controller bias 0); q/k/v/o untouched.
  void reset_psa_parameters();

  void set_temperature(double tau);
  double temperature() const { return config_.temperature; }
  // c_r += gamma (target_r - f_r) with f the fractions of the noise-free
  // arg-max routes (what eval and generation use) of the last training
  // forward (no-op before one, and for the random router).
  void update_controller();

  // The last forward's weighted aux loss (alpha * load + beta * z; 0-dim fp32
  // with the router's graph), zero in eval mode and for the random router.
  torch::Tensor aux_loss() const { return aux_loss_; }
  torch::Tensor load_loss() const { return load_loss_; }
  torch::Tensor z_loss() const { return z_loss_; }
  torch::Tensor entropy_loss() const { return entropy_loss_; }
  PSARouteStats route_stats() const;
  torch::Tensor last_routes() const { return routes_; }   // [B, T] int64
  torch::Tensor last_gumbel() const { return gumbel_; }   // [B, T, 4] fp32 (training mode)

  const PSAConfig& config() const { return config_; }
  int64_t heads, kv_heads, head_dim, kv_dim, kernel_size, window, layer_index;

  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  torch::nn::Linear router{nullptr};  // [4, d] + bias [4]
  torch::Tensor conv_weight;          // [kv_dim, Kc]
  // theta [kv_dim] ("ema") or [Hkv] ("linear_attention"): the register keeps
  // sigmoid(theta) of its state per summary write.
  torch::Tensor summary_decay;
  torch::Tensor lambda_local, lambda_summary;  // [H * D]
  torch::Tensor route_bias;           // c [4], a buffer (the controller's, not trained)

 private:
  struct Routing {
    torch::Tensor index;  // [B, T] int64
    torch::Tensor gates;  // [B, T, 4] fp32: one-hot forward values, straight-through gradient
    // The largest per-row count of signal tokens (the packed length), read
    // back when called; compute() starts the read early (see read_back_later).
    std::function<int64_t()> max_signal;
    torch::Tensor signal_max;  // that count as a device scalar, if the router computed it (psa_route)
  };
  Routing route(const torch::Tensor& x, const torch::Tensor& positions, const torch::Tensor& gumbel);
  torch::Tensor random_routes(const torch::Tensor& positions) const;
  // config_.target_shares as a [4] tensor of like's device and dtype (made
  // once per device: building it from a host vector each step is a
  // blocking host-to-device copy).
  torch::Tensor target_shares_like(const torch::Tensor& like);
  // The projections, writes and reads for given routes; with `cache` (batch 1,
  // eval) the chunk continues the cached state and the cache is updated.
  torch::Tensor compute(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const Routing& routing, PSACache* cache);
  // Causal attention of the signal queries over the signal keys (their
  // values and keys gated by z_sig): q [B, H, T, D], k/v [B, Hkv, T, D] ->
  // [B, H, T, D]; rows of non-signal tokens hold anything (the caller gates
  // every row by signal * z_sig).
  torch::Tensor signal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                 const Routing& routing, PSACache* cache);
  // PSAConfig::all_tokens_read_signal's read: every query over the signal
  // keys at or before it -> [B, T, H * D].
  torch::Tensor signal_read_all(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const Routing& routing, PSACache* cache);
  // PSAConfig::joint_softmax's read: one softmax over each query's window
  // and, where it reads them, the signal keys -> [B, T, H * D].
  torch::Tensor joint_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const Routing& routing, PSACache* cache);
  // Causal attention of every query over the last W tokens, pruned ones
  // removed: q [B, H, T, D], k [B, Hkv, T, D] and v [B, Hkv, T, D] already
  // gated by 1 - z_prune -> [B, H, T, D].
  torch::Tensor window_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                 const Routing& routing, PSACache* cache);
  // Training without a cache on CUDA: the local and summary streams of v
  // [B, T, kv_dim], window_attention (values u) and signal_attention (values
  // v) with one autograd node for RoPE, the streams, the window and the
  // packing: q_lin [B, T, H, D] and k_lin [B, T, Hkv, D] are the projections
  // before RoPE (cos, sin as rotary_embedding takes them). rate = 1 -
  // sigmoid(summary_decay) in fp32; taps: the conv's weight (conv_weight, or
  // lambda_local folded into it).
  struct FusedReads {
    torch::Tensor window;                  // [B, H, T, D]
    torch::Tensor signal;                  // packed [B * S, H, D] rows (S = 0: none)
    torch::Tensor signal_rows, pack_rows;  // token row -> packed row (-1: none) [B * T]; its inverse [B * S]
    torch::Tensor local, summary;          // [B, T, kv_dim]
  };
  FusedReads window_streams_and_signal(const torch::Tensor& q_lin, const torch::Tensor& k_lin, const torch::Tensor& v,
                                       const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& rate,
                                       const torch::Tensor& taps, const Routing& routing);
  // The fused CUDA decode step (kernels/psa_decode.h) over one token, or an
  // undefined tensor when this layer, dtype or device cannot take it.
  torch::Tensor decode_fused(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                             PSACache& cache);

  PSAConfig config_;
  bool fused_decode_ = true;
  bool fused_window_pack_ = true;
  torch::Tensor decode_zero_, decode_one_;  // the fused decode's aux losses and agreement
  // The parameters and buffers the fused decode checks each step, listed once:
  // to(), load_state_dict and optimizer steps update them in place, so the
  // handles stay valid, and walking the module tree per token costs more host
  // time than the checks.
  std::vector<torch::Tensor> fused_operands_;
  torch::Tensor target_shares_;  // float64 on the last device asked for
  torch::Tensor train_fractions_;  // arg-max (noise-free) fractions of the last training forward, for update_controller()
  torch::Tensor aux_loss_, load_loss_, z_loss_, entropy_loss_, routes_, gumbel_, fractions_, agreement_;
  at::Generator generator_;
};
TORCH_MODULE(PacketSwitchedAttention);

}  // namespace unswag::nn
