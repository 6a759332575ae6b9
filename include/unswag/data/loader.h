// StreamingContextDataLoader: packs the concatenated token stream of a list
// of shards into windows of T+1 tokens (input = the first T, target = the
// last T) for long-context training, in a seeded shuffled order that is
// split disjointly across data-parallel ranks, with per-document position
// ids and cu_seqlens, a background prefetch thread, and exact resumption from
// a small JSON state. docs/data.md describes the window layout and the state.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "unswag/data/shards.h"

namespace unswag::data {

enum class DocumentMode {
  kNone,           // position ids 0..T-1 in every row
  kPositionReset,  // position ids restart at 0 after each EOS
  kDocumentMask,   // position reset, plus cu_seqlens for block-diagonal causal attention
};
const char* to_string(DocumentMode mode);
// "none", "position_reset", "document_mask"; anything else is an error.
DocumentMode parse_document_mode(const std::string& name);

struct LoaderOptions {
  // Shard files, directories (their *.bin files, sorted) or glob patterns, in
  // stream order.
  std::vector<std::string> inputs;
  ShardFormat format = ShardFormat::kAuto;
  int64_t context_length = 0;  // T
  int64_t batch_size = 1;      // B, rows per rank and step
  uint64_t seed = 0;
  bool shuffle = true;
  // Needed by the document modes. -1: taken from the UnSwag shards' headers
  // (they must agree). A value that differs from a shard's header is an error.
  int64_t eos_id = -1;
  int64_t rank = 0, world_size = 1;
  DocumentMode document_mode = DocumentMode::kNone;
  // Batches prepared ahead by one background thread; 0 prepares each batch in
  // next() on the caller's thread.
  int64_t prefetch = 2;
  // Pinned host buffers; default: when CUDA is available.
  std::optional<bool> pin_memory;
  // Copy every batch to this device in next() (asynchronously from pinned
  // memory, on the caller's current stream).
  std::optional<c10::Device> device;
  // > 0: every token of every shard is checked to be below it at start (a
  // full read of the data).
  int64_t vocab_size = 0;
};

// One step's rows for this rank. Window w covers stream tokens
// [w*T, w*T + T + 1): input_ids = its first T tokens, targets = its last T.
struct Batch {
  at::Tensor input_ids;     // [B, T] int64
  at::Tensor targets;       // [B, T] int64
  at::Tensor position_ids;  // [B, T] int64
  // document_mask only: int32 [D + 1], the start of every document piece in
  // the flattened [B*T] batch plus B*T at the end (FlashAttention varlen
  // layout); every row starts a new piece. Undefined otherwise.
  at::Tensor cu_seqlens;
  int64_t max_seqlen = 0;  // longest piece (document_mask), else T
  at::Tensor window_ids;   // [B] int64, the window of each row
  int64_t epoch = 0;
  int64_t step = 0;  // within the epoch
};

// Where the stream stands: restores the identical sequence of batches.
// Identical on every rank except `rank`, which is informational (any rank can
// resume from rank 0's state).
struct LoaderState {
  int64_t epoch = 0;
  int64_t next_window = 0;  // position of the next batch's first window in the epoch's order (all ranks)
  uint64_t seed = 0;
  bool shuffle = true;
  int64_t context_length = 0, batch_size = 0, world_size = 1, rank = 0;
  std::vector<std::pair<std::string, int64_t>> inputs;  // (file name, token count) per shard

  std::string to_json() const;
  static LoaderState from_json(const std::string& text);
};

// The order of the windows of one epoch: a bijection of [0, n) computed per
// index (O(1) memory whatever n): a 6-round Feistel network keyed by
// (seed, epoch) on the smallest even-bit power of two >= max(n, 2^12), with
// cycle walking back into [0, n). The identity when shuffle is off.
class WindowOrder {
 public:
  WindowOrder(int64_t num_windows, uint64_t seed, int64_t epoch, bool shuffle);
  int64_t operator()(int64_t position) const;  // the window at `position`
  int64_t position_of(int64_t window) const;   // the inverse

 private:
  int64_t walk(int64_t start, const char* what, bool inverse) const;
  uint64_t encrypt(uint64_t x) const;
  uint64_t decrypt(uint64_t x) const;
  uint64_t round(uint64_t half, int r) const;
  static constexpr int kRounds = 6, kMinHalfBits = 6;
  int64_t n_;
  bool shuffle_;
  int half_bits_ = kMinHalfBits;
  uint64_t half_mask_ = 0x3F;
  uint64_t keys_[kRounds] = {};
};

class StreamingContextDataLoader {
 public:
  explicit StreamingContextDataLoader(LoaderOptions options);
  StreamingContextDataLoader(LoaderOptions options, const LoaderState& state);
  ~StreamingContextDataLoader();
  StreamingContextDataLoader(const StreamingContextDataLoader&) = delete;
  StreamingContextDataLoader& operator=(const StreamingContextDataLoader&) = delete;

  // The next batch; epochs follow each other without end.
  Batch next();
  // The position after the last batch returned by next() (batches prefetched
  // but not returned are not counted).
  LoaderState state() const;
  // Continues from `state`; an error when it was saved for other inputs,
  // another world size, context length, seed or shuffle setting.
  void load_state(const LoaderState& state);

  int64_t num_tokens() const { return starts_.back(); }
  int64_t num_windows() const { return num_windows_; }
  int64_t steps_per_epoch() const { return steps_per_epoch_; }
  int64_t eos_id() const { return eos_id_; }
  const std::vector<TokenShard>& shards() const { return shards_; }
  const LoaderOptions& options() const { return options_; }

  // Writes stream tokens [begin, begin + count) as int64 to out (across shards).
  void copy_stream(int64_t begin, int64_t count, int64_t* out) const;

 private:
  struct Cursor {
    int64_t epoch = 0, position = 0;
  };
  Batch make_batch(Cursor at) const;
  Cursor advance(Cursor c) const;
  void start_worker();
  void stop_worker();
  void worker_loop();

  LoaderOptions options_;
  std::vector<TokenShard> shards_;
  std::vector<int64_t> starts_;  // starts_[i] = stream offset of shard i; back() = total tokens
  int64_t num_windows_ = 0, steps_per_epoch_ = 0, eos_id_ = -1;
  bool pin_ = false;
  Cursor consumer_;

  // Prefetch: one worker fills `ready_` in step order from `producer_`.
  std::thread worker_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Batch> ready_;
  std::exception_ptr worker_error_;
  Cursor producer_;
  bool stopping_ = false;
};

}  // namespace unswag::data
