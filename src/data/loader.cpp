// StreamingContextDataLoader (unswag/data/loader.h): window packing across
// shard boundaries, the per-epoch Feistel window order, the split across
// ranks, position ids and cu_seqlens per document, the prefetch thread, and
// the JSON state for exact resumption.
#include "unswag/data/loader.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <numeric>

namespace unswag::data {

// ------------------------------------------------------------------ modes ---

const char* to_string(DocumentMode mode) {
  switch (mode) {
    case DocumentMode::kNone: return "none";
    case DocumentMode::kPositionReset: return "position_reset";
    case DocumentMode::kDocumentMask: return "document_mask";
  }
  return "?";
}

DocumentMode parse_document_mode(const std::string& name) {
  if (name == "none") return DocumentMode::kNone;
  if (name == "position_reset") return DocumentMode::kPositionReset;
  if (name == "document_mask") return DocumentMode::kDocumentMask;
  TORCH_CHECK(false, "loader: document_mode must be one of none, position_reset, document_mask; got \"", name, "\"");
}

// ----------------------------------------------------------- window order ---

namespace {

// SplitMix64's finaliser: a bijective 64-bit mixer with full avalanche.
uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

WindowOrder::WindowOrder(int64_t num_windows, uint64_t seed, int64_t epoch, bool shuffle)
    : n_(num_windows), shuffle_(shuffle) {
  TORCH_CHECK(num_windows >= 0, "loader: WindowOrder: num_windows must be >= 0, got ", num_windows);
  // 2 * half_bits_ >= ceil(log2(n)): the Feistel domain covers [0, n) and,
  // above 2^12, is less than 4n, so cycle walking takes under 4 encryptions
  // on average.
  int bits = 0;
  while (bits < 63 && (uint64_t(1) << bits) < uint64_t(num_windows)) ++bits;
  // At least 6 bits per half: Feistel networks on tiny halves come from a
  // small family of permutations, some close to the identity (seen as runs
  // of fixed points: up to 14 of 31 with 3-bit halves and 4 rounds). Cycle
  // walking in the 2^12 domain costs about 2^12 encryptions per epoch in all
  // for small n.
  half_bits_ = std::max(kMinHalfBits, (bits + 1) / 2);
  half_mask_ = half_bits_ >= 64 ? ~uint64_t(0) : (uint64_t(1) << half_bits_) - 1;
  // The epoch goes through its own mixer before meeting the seed, so that
  // (seed, epoch) and (seed ^ 1, epoch ^ 1)-like pairs do not collide.
  const uint64_t key = mix64(seed ^ mix64(uint64_t(epoch) + 0x632BE59BD9B4E019ull));
  for (int r = 0; r < kRounds; ++r) keys_[r] = mix64(key + uint64_t(r) * 0xD1B54A32D192ED03ull);
}

uint64_t WindowOrder::round(uint64_t half, int r) const { return mix64(half ^ keys_[r]) & half_mask_; }

// One Feistel round maps (L, R) to (R, L ^ F(R)); it is undone by
// (L', R') -> (R' ^ F(L'), L'), so the whole network is a bijection.
uint64_t WindowOrder::encrypt(uint64_t x) const {
  uint64_t left = (x >> half_bits_) & half_mask_, right = x & half_mask_;
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t next = left ^ round(right, r);
    left = right;
    right = next;
  }
  return (left << half_bits_) | right;
}

uint64_t WindowOrder::decrypt(uint64_t x) const {
  uint64_t left = (x >> half_bits_) & half_mask_, right = x & half_mask_;
  for (int r = kRounds - 1; r >= 0; --r) {
    const uint64_t previous = right ^ round(left, r);
    right = left;
    left = previous;
  }
  return (left << half_bits_) | right;
}

// Cycle walking: applying the permutation of the larger domain until the
// value falls back into [0, n) restricts it to a permutation of [0, n).
int64_t WindowOrder::walk(int64_t start, const char* what, bool inverse) const {
  TORCH_CHECK(start >= 0 && start < n_, "loader: ", what, " ", start, " out of range [0, ", n_, ")");
  if (!shuffle_) return start;
  uint64_t x = uint64_t(start);
  do x = inverse ? decrypt(x) : encrypt(x);
  while (x >= uint64_t(n_));
  return int64_t(x);
}

int64_t WindowOrder::operator()(int64_t position) const { return walk(position, "window position", false); }

int64_t WindowOrder::position_of(int64_t window) const { return walk(window, "window", true); }

// ------------------------------------------------------------------ state ---

namespace {

using json = nlohmann::json;

std::string base_name(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string describe(const std::vector<std::pair<std::string, int64_t>>& inputs) {
  std::string s;
  for (size_t i = 0; i < inputs.size() && i < 4; ++i)
    s += (i ? ", " : "") + inputs[i].first + " (" + std::to_string(inputs[i].second) + " tokens)";
  if (inputs.size() > 4) s += ", ... (" + std::to_string(inputs.size()) + " files)";
  return "[" + s + "]";
}

template <typename T>
T field(const json& j, const char* name) {
  TORCH_CHECK(j.contains(name), "loader: state JSON has no \"", name, "\" field");
  try {
    return j.at(name).get<T>();
  } catch (const json::exception&) {
    TORCH_CHECK(false, "loader: state JSON field \"", name, "\" has the wrong type (", j.at(name).dump(), ")");
  }
}

}  // namespace

std::string LoaderState::to_json() const {
  json inputs_json = json::array();
  for (const auto& [name, tokens] : inputs) inputs_json.push_back({name, tokens});
  return json{{"format", "unswag.loader_state"},
              {"version", 1},
              {"epoch", epoch},
              {"next_window", next_window},
              {"seed", seed},
              {"shuffle", shuffle},
              {"context_length", context_length},
              {"batch_size", batch_size},
              {"world_size", world_size},
              {"rank", rank},
              {"inputs", inputs_json}}
      .dump();
}

LoaderState LoaderState::from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "loader: state is not valid JSON (", e.what(), ")");
  }
  TORCH_CHECK(j.is_object() && j.value("format", "") == "unswag.loader_state", "loader: state JSON is not an ",
              "UnSwag loader state (expected \"format\": \"unswag.loader_state\")");
  TORCH_CHECK(field<int64_t>(j, "version") == 1, "loader: state version ", j.at("version").dump(),
              " is not supported (expected 1)");
  LoaderState s;
  s.epoch = field<int64_t>(j, "epoch");
  s.next_window = field<int64_t>(j, "next_window");
  s.seed = field<uint64_t>(j, "seed");
  s.shuffle = field<bool>(j, "shuffle");
  s.context_length = field<int64_t>(j, "context_length");
  s.batch_size = field<int64_t>(j, "batch_size");
  s.world_size = field<int64_t>(j, "world_size");
  s.rank = field<int64_t>(j, "rank");
  s.inputs = field<std::vector<std::pair<std::string, int64_t>>>(j, "inputs");
  TORCH_CHECK(s.epoch >= 0 && s.next_window >= 0, "loader: state has a negative epoch (", s.epoch,
              ") or next_window (", s.next_window, ")");
  return s;
}

// ----------------------------------------------------------------- loader ---

StreamingContextDataLoader::StreamingContextDataLoader(LoaderOptions options) : options_(std::move(options)) {
  const LoaderOptions& o = options_;
  TORCH_CHECK(!o.inputs.empty(), "loader: inputs is empty; expected shard files, directories or glob patterns");
  TORCH_CHECK(o.context_length >= 1, "loader: context_length must be >= 1, got ", o.context_length);
  TORCH_CHECK(o.batch_size >= 1, "loader: batch_size must be >= 1, got ", o.batch_size);
  TORCH_CHECK(o.world_size >= 1, "loader: world_size must be >= 1, got ", o.world_size);
  TORCH_CHECK(o.rank >= 0 && o.rank < o.world_size, "loader: rank must be in [0, world_size = ", o.world_size,
              "), got ", o.rank);
  TORCH_CHECK(o.prefetch >= 0, "loader: prefetch must be >= 0, got ", o.prefetch);
  TORCH_CHECK(o.vocab_size >= 0, "loader: vocab_size must be >= 0 (0: unchecked), got ", o.vocab_size);
  TORCH_CHECK(o.eos_id >= -1, "loader: eos_id must be >= 0, or -1 to take it from the shards; got ", o.eos_id);
  int64_t rows_per_step = 0, tokens_per_batch = 0;
  TORCH_CHECK(!__builtin_mul_overflow(o.batch_size, o.world_size, &rows_per_step) &&
                  !__builtin_mul_overflow(o.batch_size, o.context_length, &tokens_per_batch),
              "loader: batch_size ", o.batch_size, " x world_size ", o.world_size, " x context_length ",
              o.context_length, " overflows 64 bits");
  if (o.document_mode == DocumentMode::kDocumentMask)
    TORCH_CHECK(tokens_per_batch <= INT32_MAX, "loader: document_mask gives int32 cu_seqlens, so batch_size x ",
                "context_length must be <= ", INT32_MAX, "; got ", o.batch_size, " x ", o.context_length);

  // Shards, their stream offsets, and the EOS id they record.
  starts_.push_back(0);
  eos_id_ = o.eos_id;
  std::string eos_from;
  for (const std::string& path : expand_inputs(o.inputs, "loader", ".bin")) {
    shards_.push_back(TokenShard::open(path, o.format, o.vocab_size));
    const TokenShard& shard = shards_.back();
    starts_.push_back(starts_.back() + shard.num_tokens());
    if (shard.eos_id() < 0) continue;
    if (o.eos_id >= 0) {
      TORCH_CHECK(shard.eos_id() == o.eos_id, "loader: eos_id is ", o.eos_id, " but ", path,
                  " was written with EOS ", shard.eos_id(), " (another tokenizer?)");
    } else if (eos_id_ < 0) {
      eos_id_ = shard.eos_id();
      eos_from = path;
    } else {
      TORCH_CHECK(shard.eos_id() == eos_id_, "loader: shards disagree on EOS: ", eos_from, " has ", eos_id_, ", ",
                  path, " has ", shard.eos_id());
    }
  }
  TORCH_CHECK(o.document_mode == DocumentMode::kNone || eos_id_ >= 0, "loader: document_mode ",
              to_string(o.document_mode), " needs eos_id, and the shards do not record one (llm.c and nanoGPT ",
              "files never do); pass eos_id (GPT-2: 50256)");

  // Window w covers [w*T, w*T + T + 1): windows overlap by one token so that
  // every token but the first is a target exactly once; W = floor((N-1)/T).
  const int64_t total = starts_.back(), T = o.context_length;
  num_windows_ = total > T ? (total - 1) / T : 0;
  TORCH_CHECK(num_windows_ > 0, "loader: context_length ", T, " needs at least ", T, " + 1 tokens, but the ",
              shards_.size(), " input file(s) hold ", total, " tokens");
  steps_per_epoch_ = num_windows_ / rows_per_step;
  TORCH_CHECK(steps_per_epoch_ > 0, "loader: a step takes batch_size ", o.batch_size, " x world_size ",
              o.world_size, " = ", rows_per_step, " windows, but the inputs give only ", num_windows_,
              " windows of context_length ", T, " + 1 tokens (", total, " tokens)");

  const bool cuda = torch::cuda::is_available();
  pin_ = o.pin_memory.value_or(cuda);
  TORCH_CHECK(!pin_ || cuda, "loader: pin_memory needs CUDA, which is not available here");
  TORCH_CHECK(!o.device || !o.device->is_cuda() || cuda, "loader: device ", o.device->str(),
              " was requested but CUDA is not available");
  start_worker();
}

StreamingContextDataLoader::StreamingContextDataLoader(LoaderOptions options, const LoaderState& state)
    : StreamingContextDataLoader(std::move(options)) {
  load_state(state);
}

StreamingContextDataLoader::~StreamingContextDataLoader() { stop_worker(); }

void StreamingContextDataLoader::copy_stream(int64_t begin, int64_t count, int64_t* out) const {
  TORCH_CHECK(begin >= 0 && count >= 0 && begin + count <= starts_.back(), "loader: stream tokens [", begin, ", ",
              begin + count, ") out of range [0, ", starts_.back(), ")");
  // The shard holding `begin`: the last start <= begin (empty shards share a
  // start with their successor and are skipped by upper_bound).
  size_t s = size_t(std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin()) - 1;
  while (count > 0) {
    const int64_t take = std::min(count, starts_[s + 1] - begin);
    if (take > 0) shards_[s].copy_tokens(begin - starts_[s], take, out);
    out += take;
    begin += take;
    count -= take;
    ++s;
  }
}

StreamingContextDataLoader::Cursor StreamingContextDataLoader::advance(Cursor c) const {
  c.position += options_.batch_size * options_.world_size;
  if (c.position / (options_.batch_size * options_.world_size) >= steps_per_epoch_) c = {c.epoch + 1, 0};
  return c;
}

Batch StreamingContextDataLoader::make_batch(Cursor at) const {
  const int64_t B = options_.batch_size, T = options_.context_length;
  const auto options = at::TensorOptions().dtype(at::kLong).pinned_memory(pin_);
  Batch batch;
  batch.epoch = at.epoch;
  batch.step = at.position / (B * options_.world_size);
  batch.input_ids = at::empty({B, T}, options);
  batch.targets = at::empty({B, T}, options);
  batch.position_ids = at::empty({B, T}, options);
  batch.window_ids = at::empty({B}, options);
  int64_t* input = batch.input_ids.data_ptr<int64_t>();
  int64_t* target = batch.targets.data_ptr<int64_t>();
  int64_t* position = batch.position_ids.data_ptr<int64_t>();
  int64_t* window = batch.window_ids.data_ptr<int64_t>();

  // This rank's rows: B consecutive positions of the epoch's order, after the
  // rows of the lower ranks.
  const WindowOrder order(num_windows_, options_.seed, at.epoch, options_.shuffle);
  const int64_t first = at.position + options_.rank * B;
  for (int64_t j = 0; j < B; ++j) window[j] = order(first + j);
  // No madvise(WILLNEED) ahead of the copies: on the development VM it made
  // cold-cache epochs 1.3-2x slower than the kernel's fault read-around.
  for (int64_t j = 0; j < B; ++j) {
    copy_stream(window[j] * T, T, input + j * T);
    copy_stream(window[j] * T + 1, T, target + j * T);
  }

  if (options_.document_mode == DocumentMode::kNone) {
    for (int64_t j = 0; j < B; ++j) std::iota(position + j * T, position + (j + 1) * T, int64_t(0));
    batch.max_seqlen = T;
    return batch;
  }
  // A document ends with its EOS token, so the token after an EOS starts a
  // new one: position p[t] = 0 if t == 0 or x[t-1] == EOS, else p[t-1] + 1.
  std::vector<int32_t> starts;
  const bool mask = options_.document_mode == DocumentMode::kDocumentMask;
  for (int64_t j = 0; j < B; ++j) {
    const int64_t* x = input + j * T;
    int64_t* p = position + j * T;
    int64_t next_position = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (mask && next_position == 0) starts.push_back(int32_t(j * T + t));
      p[t] = next_position;
      next_position = x[t] == eos_id_ ? 0 : next_position + 1;
    }
  }
  if (!mask) {
    batch.max_seqlen = T;
    return batch;
  }
  starts.push_back(int32_t(B * T));
  batch.cu_seqlens = at::empty({int64_t(starts.size())}, options.dtype(at::kInt));
  std::memcpy(batch.cu_seqlens.data_ptr<int32_t>(), starts.data(), starts.size() * sizeof(int32_t));
  for (size_t i = 0; i + 1 < starts.size(); ++i) batch.max_seqlen = std::max<int64_t>(batch.max_seqlen, starts[i + 1] - starts[i]);
  return batch;
}

// --------------------------------------------------------------- prefetch ---

void StreamingContextDataLoader::start_worker() {
  if (options_.prefetch == 0) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = false;
    ready_.clear();
    worker_error_ = nullptr;
    producer_ = consumer_;
  }
  worker_ = std::thread([this] { worker_loop(); });
}

void StreamingContextDataLoader::stop_worker() {
  if (!worker_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  worker_.join();
}

// Batches are produced strictly in step order into a bounded queue, so what
// next() returns depends only on the cursor, never on timing.
void StreamingContextDataLoader::worker_loop() {
  for (;;) {
    Cursor at;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [&] { return stopping_ || int64_t(ready_.size()) < options_.prefetch; });
      if (stopping_ || worker_error_) return;
      at = producer_;
      producer_ = advance(producer_);
    }
    try {
      Batch batch = make_batch(at);
      std::lock_guard<std::mutex> lock(mutex_);
      ready_.push_back(std::move(batch));
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      worker_error_ = std::current_exception();
      changed_.notify_all();
      return;
    }
    changed_.notify_all();
  }
}

Batch StreamingContextDataLoader::next() {
  Batch batch;
  if (options_.prefetch == 0) {
    batch = make_batch(consumer_);
  } else {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return !ready_.empty() || worker_error_; });
    if (ready_.empty()) std::rethrow_exception(worker_error_);
    batch = std::move(ready_.front());
    ready_.pop_front();
    lock.unlock();
    changed_.notify_all();
  }
  TORCH_INTERNAL_ASSERT(batch.epoch == consumer_.epoch &&
                        batch.step == consumer_.position / (options_.batch_size * options_.world_size));
  consumer_ = advance(consumer_);
  if (options_.device) {
    const auto to_device = [&](at::Tensor& t) {
      if (t.defined()) t = t.to(at::TensorOptions().device(*options_.device), /*non_blocking=*/pin_);
    };
    for (at::Tensor* t : {&batch.input_ids, &batch.targets, &batch.position_ids, &batch.cu_seqlens, &batch.window_ids})
      to_device(*t);
  }
  return batch;
}

// ------------------------------------------------------------- resumption ---

LoaderState StreamingContextDataLoader::state() const {
  LoaderState s;
  s.epoch = consumer_.epoch;
  s.next_window = consumer_.position;
  s.seed = options_.seed;
  s.shuffle = options_.shuffle;
  s.context_length = options_.context_length;
  s.batch_size = options_.batch_size;
  s.world_size = options_.world_size;
  s.rank = options_.rank;
  for (const TokenShard& shard : shards_) s.inputs.emplace_back(base_name(shard.path()), shard.num_tokens());
  return s;
}

void StreamingContextDataLoader::load_state(const LoaderState& s) {
  const LoaderState mine = state();
  TORCH_CHECK(s.inputs == mine.inputs, "loader: the state was saved for inputs ", describe(s.inputs),
              " but this loader reads ", describe(mine.inputs), "; resume with the same shards in the same order");
  TORCH_CHECK(s.world_size == mine.world_size, "loader: the state was saved with world_size ", s.world_size,
              " but this loader has world_size ", mine.world_size,
              "; the split of windows across ranks depends on it, so resume with the same world size");
  TORCH_CHECK(s.context_length == mine.context_length, "loader: the state was saved with context_length ",
              s.context_length, " but this loader has ", mine.context_length);
  TORCH_CHECK(s.seed == mine.seed && s.shuffle == mine.shuffle, "loader: the state was saved with seed ", s.seed,
              " shuffle ", s.shuffle, " but this loader has seed ", mine.seed, " shuffle ", mine.shuffle);
  const int64_t rows_per_step = options_.batch_size * options_.world_size;
  TORCH_CHECK(s.epoch >= 0 && s.next_window >= 0 && s.next_window % rows_per_step == 0 &&
                  s.next_window / rows_per_step < steps_per_epoch_,
              "loader: state position (epoch ", s.epoch, ", next_window ", s.next_window,
              ") is not the start of a step for batch_size ", options_.batch_size, " x world_size ",
              options_.world_size, " (", steps_per_epoch_, " steps per epoch)");
  stop_worker();
  consumer_ = {s.epoch, s.next_window};
  start_worker();
}

}  // namespace unswag::data
