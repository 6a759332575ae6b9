// Tests of StreamingContextDataLoader against a naive reference built from the
// concatenated tokens of all shards: packing into T+1-token windows across
// shard boundaries, the window order (a permutation per epoch, deterministic
// per seed), the split across ranks, position ids and cu_seqlens per
// document, exact resumption at random points with prefetch on, and errors.
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <climits>
#include <map>
#include <set>

#include "data/data_test_util.h"
#include "test_util.h"
#include "unswag/data/loader.h"

namespace unswag {
namespace {

namespace data = unswag::data;
using test::expect_error;
using test::write_bytes;

// Shards of the given sizes in rotating formats (UnSwag uint16/uint32, llm.c
// v1/v7, nanoGPT), with ids below `vocab`; `eos_every` > 0 makes about one
// token in eos_every an EOS (id 0), runs of EOS included.
struct Corpus {
  std::vector<std::string> paths;
  std::vector<int64_t> stream;  // all tokens, in order
};

class DataLoader : public test::DataTest {
 protected:
  Corpus make_corpus(const std::vector<size_t>& sizes, int eos_every = 0, bool unswag_only = false) {
    Corpus c;
    for (size_t i = 0; i < sizes.size(); ++i) {
      std::vector<uint32_t> tokens = test::random_tokens(rng_, sizes[i], 60000);
      for (auto& t : tokens) {
        if (t == 0) t = 1;
        if (eos_every > 0 && rng_() % uint64_t(eos_every) == 0) t = 0;
      }
      const std::string path = in_dir("shard_" + std::to_string(1000 + i) + ".bin");
      const uint64_t docs = uint64_t(std::count(tokens.begin(), tokens.end(), 0u));
      switch (unswag_only ? i % 2 : i % 5) {
        case 0: write_bytes(path, test::unswag_shard_bytes(tokens, 2, 0, docs)); break;
        case 1: write_bytes(path, test::unswag_shard_bytes(tokens, 4, 0, docs)); break;
        case 2: write_bytes(path, test::llmc_shard_bytes(tokens, 1)); break;
        case 3: write_bytes(path, test::llmc_shard_bytes(tokens, 7)); break;
        default: write_bytes(path, test::nanogpt_bytes(tokens)); break;
      }
      c.paths.push_back(path);
      c.stream.insert(c.stream.end(), tokens.begin(), tokens.end());
    }
    return c;
  }

  data::LoaderOptions options_for(const Corpus& c, int64_t T, int64_t B) const {
    data::LoaderOptions o;
    o.inputs = c.paths;
    o.context_length = T;
    o.batch_size = B;
    o.seed = seed_;
    o.eos_id = 0;
    return o;
  }
};

// The reference batch, from the concatenated stream: row j of rank r at step
// s is the window at position s*B*world + r*B + j of the epoch's order, and
// window w is stream[w*T, w*T + T + 1).
struct Reference {
  torch::Tensor input, target, window;
};

Reference reference_batch(const std::vector<int64_t>& stream, const data::LoaderOptions& o, int64_t epoch,
                          int64_t step) {
  const int64_t T = o.context_length, B = o.batch_size;
  const int64_t W = (int64_t(stream.size()) - 1) / T;
  const data::WindowOrder order(W, o.seed, epoch, o.shuffle);
  Reference r{torch::empty({B, T}, torch::kLong), torch::empty({B, T}, torch::kLong), torch::empty({B}, torch::kLong)};
  for (int64_t j = 0; j < B; ++j) {
    const int64_t w = order(step * B * o.world_size + o.rank * B + j);
    r.window[j] = w;
    for (int64_t t = 0; t < T; ++t) {
      r.input[j][t] = stream[size_t(w * T + t)];
      r.target[j][t] = stream[size_t(w * T + t + 1)];
    }
  }
  return r;
}

// Positions and document starts written from the definition: a document
// starts at t = 0 and after every EOS; the position is the distance to the
// last start.
void reference_documents(const torch::Tensor& input, int64_t eos, torch::Tensor& positions,
                         std::vector<int32_t>& cu_seqlens) {
  const int64_t B = input.size(0), T = input.size(1);
  positions = torch::empty({B, T}, torch::kLong);
  cu_seqlens.clear();
  for (int64_t j = 0; j < B; ++j) {
    std::vector<int64_t> starts = {0};
    for (int64_t t = 0; t + 1 < T; ++t)
      if (input[j][t].item<int64_t>() == eos) starts.push_back(t + 1);
    for (int64_t s : starts) cu_seqlens.push_back(int32_t(j * T + s));
    for (int64_t t = 0; t < T; ++t) {
      const int64_t last = *(std::upper_bound(starts.begin(), starts.end(), t) - 1);
      positions[j][t] = t - last;
    }
  }
  cu_seqlens.push_back(int32_t(B * T));
}

bool same_batch(const data::Batch& a, const data::Batch& b) {
  auto same = [](const torch::Tensor& x, const torch::Tensor& y) {
    return x.defined() == y.defined() && (!x.defined() || torch::equal(x, y));
  };
  return a.epoch == b.epoch && a.step == b.step && a.max_seqlen == b.max_seqlen && same(a.input_ids, b.input_ids) &&
         same(a.targets, b.targets) && same(a.position_ids, b.position_ids) && same(a.cu_seqlens, b.cu_seqlens) &&
         same(a.window_ids, b.window_ids);
}

TEST_F(DataLoader, PackingMatchesNaiveReference) {
  SCOPED_TRACE(trace());
  for (int trial = 0; trial < 6; ++trial) {
    std::vector<size_t> sizes;
    for (int i = 0, n = 1 + int(rng_() % 7); i < n; ++i) sizes.push_back(rng_() % 4 == 0 ? 0 : rng_() % 300);
    sizes.push_back(64 + rng_() % 200);
    const Corpus c = make_corpus(sizes);
    data::LoaderOptions o = options_for(c, 1 + int64_t(rng_() % 40), 1 + int64_t(rng_() % 3));
    o.shuffle = trial % 2 == 1;
    o.prefetch = int64_t(rng_() % 4);
    const int64_t W = (int64_t(c.stream.size()) - 1) / o.context_length;
    if (W < o.batch_size) continue;
    SCOPED_TRACE("T=" + std::to_string(o.context_length) + " B=" + std::to_string(o.batch_size) +
                 " shuffle=" + std::to_string(o.shuffle) + " prefetch=" + std::to_string(o.prefetch));
    data::StreamingContextDataLoader loader(o);
    ASSERT_EQ(loader.num_tokens(), int64_t(c.stream.size()));
    ASSERT_EQ(loader.num_windows(), W);
    ASSERT_EQ(loader.steps_per_epoch(), W / o.batch_size);
    const torch::Tensor arange = torch::arange(o.context_length, torch::kLong).expand({o.batch_size, -1});
    for (int64_t k = 0; k < 2 * loader.steps_per_epoch() + 3; ++k) {
      const data::Batch b = loader.next();
      ASSERT_EQ(b.epoch, k / loader.steps_per_epoch());
      ASSERT_EQ(b.step, k % loader.steps_per_epoch());
      const Reference r = reference_batch(c.stream, o, b.epoch, b.step);
      ASSERT_EQ(b.input_ids.sizes(), (std::vector<int64_t>{o.batch_size, o.context_length}));
      ASSERT_EQ(b.input_ids.scalar_type(), torch::kLong);
      ASSERT_TRUE(torch::equal(b.input_ids, r.input)) << "step " << k;
      ASSERT_TRUE(torch::equal(b.targets, r.target)) << "step " << k;
      ASSERT_TRUE(torch::equal(b.window_ids, r.window)) << "step " << k;
      ASSERT_TRUE(torch::equal(b.position_ids, arange));
      ASSERT_FALSE(b.cu_seqlens.defined());
    }
  }
}

TEST_F(DataLoader, WindowsCrossShardBoundaries) {
  SCOPED_TRACE(trace());
  // Shards shorter than a window, empty ones between: every window spans
  // several files.
  const Corpus c = make_corpus({3, 0, 1, 5, 0, 0, 2, 7, 1, 4});
  data::LoaderOptions o = options_for(c, 4, 1);
  o.shuffle = false;
  o.prefetch = 0;
  data::StreamingContextDataLoader loader(o);
  ASSERT_EQ(loader.num_windows(), (23 - 1) / 4);
  for (int64_t w = 0; w < loader.num_windows(); ++w) {
    const data::Batch b = loader.next();
    for (int64_t t = 0; t < 4; ++t) {
      EXPECT_EQ(b.input_ids[0][t].item<int64_t>(), c.stream[size_t(4 * w + t)]);
      EXPECT_EQ(b.targets[0][t].item<int64_t>(), c.stream[size_t(4 * w + t + 1)]);
    }
  }
  // copy_stream over every range agrees with the stream.
  for (int trial = 0; trial < 100; ++trial) {
    const int64_t begin = int64_t(rng_() % 24), count = int64_t(rng_() % (24 - begin));
    std::vector<int64_t> out(static_cast<size_t>(count));
    loader.copy_stream(begin, count, out.data());
    EXPECT_TRUE(std::equal(out.begin(), out.end(), c.stream.begin() + begin));
  }
  std::vector<int64_t> out(2);
  expect_error([&] { loader.copy_stream(22, 2, out.data()); }, {"out of range"});
}

TEST(DataWindowOrder, PermutationPerEpochDeterministicPerSeed) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const int64_t n : {int64_t(1), int64_t(2), int64_t(3), int64_t(4), int64_t(5), int64_t(17), int64_t(1000),
                          int64_t(4097), int64_t(1 + rng() % 50000)}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    for (const int64_t epoch : {int64_t(0), int64_t(1), int64_t(rng() % 1000000)}) {
      const data::WindowOrder order(n, seed, epoch, true), again(n, seed, epoch, true);
      std::vector<int64_t> seen(static_cast<size_t>(n), 0), values(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        const int64_t w = order(i);
        ASSERT_TRUE(w >= 0 && w < n) << w;
        ++seen[size_t(w)];
        values[size_t(i)] = w;
        ASSERT_EQ(order.position_of(w), i);
        ASSERT_EQ(again(i), w);
      }
      EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int64_t k) { return k == 1; })) << "not a permutation";
      if (n >= 17) {
        const data::WindowOrder next_epoch(n, seed, epoch + 1, true), other_seed(n, seed + 1, epoch, true);
        int64_t same_epoch = 0, same_seed = 0, fixed = 0;
        for (int64_t i = 0; i < n; ++i) {
          same_epoch += next_epoch(i) == values[size_t(i)];
          same_seed += other_seed(i) == values[size_t(i)];
          fixed += values[size_t(i)] == i;
        }
        // A random permutation agrees with another in about 1 place.
        EXPECT_LT(same_epoch, n / 2);
        EXPECT_LT(same_seed, n / 2);
        EXPECT_LT(fixed, n / 2);
      }
    }
    const data::WindowOrder identity(n, seed, 3, false);
    for (int64_t i = 0; i < n; i += 1 + n / 50) EXPECT_EQ(identity(i), i);
  }
  // Domains far beyond int32 (and beyond what could be enumerated): the
  // inverse undoes the order and values stay in range.
  const int64_t huge = (int64_t(1) << 40) + 12345;
  const data::WindowOrder order(huge, seed, 7, true);
  std::set<int64_t> images;
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t p = int64_t(rng() % uint64_t(huge));
    const int64_t w = order(p);
    ASSERT_TRUE(w >= 0 && w < huge);
    ASSERT_EQ(order.position_of(w), p);
    images.insert(w);
  }
  EXPECT_GT(images.size(), 1990u);
  expect_error([&] { order(huge); }, {"out of range"});
}

// Where window 0 lands is close to uniform over epochs: counts per position
// within 6 standard deviations of the binomial mean.
TEST(DataWindowOrder, PositionsAreSpreadUniformly) {
  const uint64_t seed = test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const int64_t n = 10, epochs = 20000;
  std::vector<int64_t> counts(n, 0);
  for (int64_t e = 0; e < epochs; ++e) ++counts[size_t(data::WindowOrder(n, seed, e, true).position_of(0))];
  const double mean = double(epochs) / n, sd = std::sqrt(mean * (1 - 1.0 / n));
  for (int64_t k = 0; k < n; ++k) EXPECT_NEAR(double(counts[size_t(k)]), mean, 6 * sd) << "position " << k;
}

TEST_F(DataLoader, RanksAreDisjointAndCoverEachEpoch) {
  SCOPED_TRACE(trace());
  const Corpus c = make_corpus({1000 + rng_() % 1000, 777, 0, 1234});
  for (const bool shuffle : {false, true}) {
    for (const int64_t world : {2, 3, 4}) {
      SCOPED_TRACE("world " + std::to_string(world) + " shuffle " + std::to_string(shuffle));
      const int64_t T = 5 + int64_t(rng_() % 20), B = 1 + int64_t(rng_() % 4);
      std::set<int64_t> all;
      int64_t rows = 0, steps = 0;
      for (int64_t rank = 0; rank < world; ++rank) {
        data::LoaderOptions o = options_for(c, T, B);
        o.shuffle = shuffle;
        o.rank = rank;
        o.world_size = world;
        data::StreamingContextDataLoader loader(o);
        steps = loader.steps_per_epoch();
        for (int64_t s = 0; s < steps; ++s) {
          const data::Batch b = loader.next();
          const Reference r = reference_batch(c.stream, o, 0, s);
          ASSERT_TRUE(torch::equal(b.input_ids, r.input) && torch::equal(b.targets, r.target));
          for (int64_t j = 0; j < B; ++j) all.insert(b.window_ids[j].item<int64_t>());
          rows += B;
        }
        EXPECT_EQ(loader.next().epoch, 1);
      }
      const int64_t W = (int64_t(c.stream.size()) - 1) / T;
      EXPECT_EQ(steps, W / (B * world));
      EXPECT_EQ(int64_t(all.size()), rows) << "ranks overlap";
      // Together they take every window but the last W mod (B*world) of the
      // order, which do not fill a step.
      EXPECT_EQ(rows, W - W % (B * world));
      const data::WindowOrder order(W, seed_, 0, shuffle);
      for (int64_t p = 0; p < W; ++p) EXPECT_EQ(all.count(order(p)), p < rows ? 1u : 0u) << "position " << p;
    }
  }
}

TEST_F(DataLoader, PositionResetAndCuSeqlensMatchReference) {
  SCOPED_TRACE(trace());
  for (const int eos_every : {2, 7, 50}) {
    const Corpus c = make_corpus({500 + rng_() % 500, 301, 1}, eos_every);
    for (const auto mode : {data::DocumentMode::kPositionReset, data::DocumentMode::kDocumentMask}) {
      SCOPED_TRACE(std::string(data::to_string(mode)) + " eos every " + std::to_string(eos_every));
      data::LoaderOptions o = options_for(c, 1 + int64_t(rng_() % 64), 1 + int64_t(rng_() % 4));
      o.document_mode = mode;
      data::StreamingContextDataLoader loader(o);
      for (int64_t s = 0; s < std::min<int64_t>(loader.steps_per_epoch(), 20); ++s) {
        const data::Batch b = loader.next();
        torch::Tensor positions;
        std::vector<int32_t> starts;
        reference_documents(b.input_ids, 0, positions, starts);
        ASSERT_TRUE(torch::equal(b.input_ids, reference_batch(c.stream, o, 0, s).input));
        ASSERT_TRUE(torch::equal(b.position_ids, positions)) << "step " << s;
        if (mode == data::DocumentMode::kPositionReset) {
          EXPECT_FALSE(b.cu_seqlens.defined());
          continue;
        }
        ASSERT_EQ(b.cu_seqlens.scalar_type(), torch::kInt);
        const std::vector<int32_t> got(b.cu_seqlens.data_ptr<int32_t>(),
                                       b.cu_seqlens.data_ptr<int32_t>() + b.cu_seqlens.numel());
        ASSERT_EQ(got, starts) << "step " << s;
        int64_t longest = 0;
        for (size_t i = 0; i + 1 < starts.size(); ++i) longest = std::max<int64_t>(longest, starts[i + 1] - starts[i]);
        EXPECT_EQ(b.max_seqlen, longest);
      }
    }
  }
}

TEST_F(DataLoader, ResumeAtRandomPointsGivesIdenticalBatches) {
  SCOPED_TRACE(trace());
  const Corpus c = make_corpus({400 + rng_() % 400, 333, 0, 250}, 9);
  data::LoaderOptions o = options_for(c, 3 + int64_t(rng_() % 17), 1 + int64_t(rng_() % 3));
  o.document_mode = data::DocumentMode::kDocumentMask;
  o.world_size = 2;
  o.rank = 1;
  o.prefetch = 3;
  std::vector<data::Batch> uninterrupted;
  {
    data::StreamingContextDataLoader loader(o);
    const int64_t total = 2 * loader.steps_per_epoch() + loader.steps_per_epoch() / 2 + 1;
    for (int64_t k = 0; k < total; ++k) uninterrupted.push_back(loader.next());
  }
  const int64_t total = int64_t(uninterrupted.size());
  for (int trial = 0; trial < 8; ++trial) {
    const int64_t stop = int64_t(rng_() % uint64_t(total));
    SCOPED_TRACE("stop after " + std::to_string(stop));
    std::string saved;
    {
      data::LoaderOptions first = o;
      first.prefetch = int64_t(rng_() % 5);
      data::StreamingContextDataLoader loader(first);
      for (int64_t k = 0; k < stop; ++k) ASSERT_TRUE(same_batch(loader.next(), uninterrupted[size_t(k)]));
      saved = loader.state().to_json();
    }  // the prefetched batches are discarded with the loader
    data::LoaderOptions second = o;
    second.prefetch = int64_t(rng_() % 5);
    second.rank = 0;  // any rank's state serves every rank: the cursor is global
    data::StreamingContextDataLoader other_rank(second, data::LoaderState::from_json(saved));
    second.rank = 1;
    data::StreamingContextDataLoader resumed(second, data::LoaderState::from_json(saved));
    for (int64_t k = stop; k < total; ++k) ASSERT_TRUE(same_batch(resumed.next(), uninterrupted[size_t(k)])) << k;
    EXPECT_EQ(other_rank.next().step, uninterrupted[size_t(stop)].step);

    // load_state on a loader that is running (prefetch queue full).
    data::StreamingContextDataLoader running(o);
    for (int i = 0; i < 3; ++i) running.next();
    running.load_state(data::LoaderState::from_json(saved));
    for (int64_t k = stop; k < std::min(total, stop + 5); ++k)
      ASSERT_TRUE(same_batch(running.next(), uninterrupted[size_t(k)])) << k;
  }
}

TEST_F(DataLoader, PrefetchDepthDoesNotChangeTheStream) {
  SCOPED_TRACE(trace());
  const Corpus c = make_corpus({3000, 17, 999}, 11);
  data::LoaderOptions o = options_for(c, 13, 3);
  o.document_mode = data::DocumentMode::kDocumentMask;
  std::vector<data::Batch> base;
  o.prefetch = 0;
  {
    data::StreamingContextDataLoader loader(o);
    for (int k = 0; k < 200; ++k) base.push_back(loader.next());
  }
  for (const int64_t depth : {1, 2, 8}) {
    o.prefetch = depth;
    data::StreamingContextDataLoader loader(o);
    for (int k = 0; k < 200; ++k) ASSERT_TRUE(same_batch(loader.next(), base[size_t(k)])) << "depth " << depth;
  }
}

TEST_F(DataLoader, StateJsonAndMismatches) {
  SCOPED_TRACE(trace());
  const Corpus c = make_corpus({500, 400});
  data::LoaderOptions o = options_for(c, 8, 2);
  data::StreamingContextDataLoader loader(o);
  for (int k = 0; k < 5; ++k) loader.next();
  const data::LoaderState s = loader.state();
  EXPECT_EQ(s.epoch, 0);
  EXPECT_EQ(s.next_window, 10);
  EXPECT_EQ(s.seed, seed_);
  ASSERT_EQ(s.inputs.size(), 2u);
  EXPECT_EQ(s.inputs[0], (std::pair<std::string, int64_t>{"shard_1000.bin", 500}));
  const data::LoaderState back = data::LoaderState::from_json(s.to_json());
  EXPECT_EQ(back.to_json(), s.to_json());
  EXPECT_EQ(back.seed, s.seed);  // 64-bit seeds survive JSON

  auto resume_with = [&](data::LoaderOptions changed) { data::StreamingContextDataLoader l(changed, s); };
  data::LoaderOptions other = o;
  other.world_size = 2;
  expect_error([&] { resume_with(other); }, {"world_size 1", "world_size 2"});
  other = o;
  other.context_length = 9;
  expect_error([&] { resume_with(other); }, {"context_length 8", "9"});
  other = o;
  other.seed = seed_ + 1;
  expect_error([&] { resume_with(other); }, {"seed"});
  other = o;
  other.shuffle = false;
  expect_error([&] { resume_with(other); }, {"shuffle"});
  other = o;
  other.inputs = {c.paths[0]};
  expect_error([&] { resume_with(other); }, {"inputs", "shard_1000.bin (500 tokens)", "shard_1001.bin (400 tokens)"});
  // Same names, different token counts.
  write_bytes(c.paths[1], test::nanogpt_bytes(test::random_tokens(rng_, 401, 100)));
  expect_error([&] { resume_with(o); }, {"inputs", "shard_1001.bin (401 tokens)"});
  other = o;
  other.batch_size = 3;  // next_window 10 is not the start of a step of 3
  write_bytes(c.paths[1], test::nanogpt_bytes(test::random_tokens(rng_, 400, 100)));
  expect_error([&] { resume_with(other); }, {"next_window 10", "batch_size 3"});
  other.batch_size = 5;  // it is for 5
  EXPECT_NO_THROW(resume_with(other));

  expect_error([] { data::LoaderState::from_json("{nope"); }, {"not valid JSON"});
  expect_error([] { data::LoaderState::from_json("{\"format\": \"x\"}"); }, {"unswag.loader_state"});
  std::string no_seed = s.to_json();
  no_seed.replace(no_seed.find("\"seed\""), 6, "\"sEEd\"");
  expect_error([&] { data::LoaderState::from_json(no_seed); }, {"no \"seed\" field"});
  std::string bad_type = s.to_json();
  bad_type.replace(bad_type.find("\"epoch\":0"), 9, "\"epoch\":\"0\"");
  expect_error([&] { data::LoaderState::from_json(bad_type); }, {"\"epoch\"", "wrong type"});
}

TEST_F(DataLoader, EosFromHeadersAndErrors) {
  SCOPED_TRACE(trace());
  const Corpus c = make_corpus({100, 100}, 5, /*unswag_only=*/true);
  data::LoaderOptions o = options_for(c, 8, 1);
  o.eos_id = -1;
  o.document_mode = data::DocumentMode::kPositionReset;
  EXPECT_EQ(data::StreamingContextDataLoader(o).eos_id(), 0);  // from the headers
  o.eos_id = 5;
  expect_error([&] { data::StreamingContextDataLoader l(o); }, {"eos_id is 5", "EOS 0", "shard_1000.bin"});
  std::vector<uint32_t> tokens(50, 3);
  write_bytes(in_dir("other_eos.bin"), test::unswag_shard_bytes(tokens, 2, 3, 50));
  o.eos_id = -1;
  o.inputs.push_back(in_dir("other_eos.bin"));
  expect_error([&] { data::StreamingContextDataLoader l(o); }, {"disagree on EOS", "other_eos.bin"});
  write_bytes(in_dir("nano.bin"), test::nanogpt_bytes(tokens));
  o.inputs = {in_dir("nano.bin")};
  expect_error([&] { data::StreamingContextDataLoader l(o); }, {"position_reset needs eos_id", "50256"});
  o.document_mode = data::DocumentMode::kNone;
  EXPECT_EQ(data::StreamingContextDataLoader(o).eos_id(), -1);  // not needed without documents
}

TEST_F(DataLoader, BadOptionsGiveClearErrors) {
  SCOPED_TRACE(trace());
  const Corpus c = make_corpus({60, 40});
  const data::LoaderOptions o = options_for(c, 8, 2);
  auto fails = [&](const std::function<void(data::LoaderOptions&)>& change, std::initializer_list<const char*> what) {
    data::LoaderOptions bad = o;
    change(bad);
    expect_error([&] { data::StreamingContextDataLoader l(bad); }, what);
  };
  // Context longer than the data: 100 tokens give no window of 100 + 1.
  fails([](auto& x) { x.context_length = 100; }, {"context_length 100", "at least 100 + 1 tokens", "hold 100 tokens"});
  fails([](auto& x) { x.context_length = 1 << 20; }, {"context_length 1048576"});
  fails([](auto& x) { x.batch_size = 13; }, {"batch_size 13", "only 12 windows"});
  fails([](auto& x) { x.world_size = 7; }, {"world_size 7", "14 windows"});
  fails([](auto& x) { x.context_length = 0; }, {"context_length must be >= 1, got 0"});
  fails([](auto& x) { x.batch_size = 0; }, {"batch_size must be >= 1, got 0"});
  fails([](auto& x) { x.rank = 2; x.world_size = 2; }, {"rank must be in [0, world_size = 2), got 2"});
  fails([](auto& x) { x.rank = -1; }, {"rank must be in"});
  fails([](auto& x) { x.prefetch = -1; }, {"prefetch must be >= 0"});
  fails([](auto& x) { x.inputs.clear(); }, {"inputs is empty"});
  fails([&](auto& x) { x.inputs = {in_dir("absent_*.bin")}; }, {"loader: pattern", "matches no file"});
  fails([](auto& x) { x.eos_id = -2; }, {"eos_id must be >= 0"});
  fails([](auto& x) { x.vocab_size = 10; }, {"vocab_size 10", "shard_1000.bin"});
  fails([](auto& x) { x.document_mode = data::DocumentMode::kDocumentMask; x.batch_size = 1 << 12; x.context_length = 1 << 20; },
        {"cu_seqlens", "2147483647"});
  fails([](auto& x) { x.batch_size = int64_t(1) << 40; x.world_size = int64_t(1) << 30; }, {"overflows 64 bits"});
  if (!torch::cuda::is_available()) {
    fails([](auto& x) { x.pin_memory = true; }, {"pin_memory needs CUDA"});
    fails([](auto& x) { x.device = torch::Device(torch::kCUDA, 0); }, {"device cuda:0", "CUDA is not available"});
  }
  expect_error([] { data::parse_document_mode("packed"); }, {"document_mode", "packed"});
  for (const auto m : {data::DocumentMode::kNone, data::DocumentMode::kPositionReset, data::DocumentMode::kDocumentMask})
    EXPECT_EQ(data::parse_document_mode(data::to_string(m)), m);
}

// A million-token context: 64-bit offsets, rows across a shard boundary.
TEST_F(DataLoader, MillionTokenContext) {
  SCOPED_TRACE(trace());
  const int64_t T = int64_t(1) << 20;
  const Corpus c = make_corpus({size_t(T + 1000), size_t(T + 7)}, 3000, /*unswag_only=*/true);
  data::LoaderOptions o = options_for(c, T, 1);
  o.document_mode = data::DocumentMode::kDocumentMask;
  data::StreamingContextDataLoader loader(o);
  ASSERT_EQ(loader.num_windows(), 2);
  for (int k = 0; k < 2; ++k) {
    const data::Batch b = loader.next();
    const int64_t w = b.window_ids[0].item<int64_t>();
    const auto from = c.stream.begin() + w * T;
    const torch::Tensor ref = torch::tensor(std::vector<int64_t>(from, from + T + 1));
    ASSERT_TRUE(torch::equal(b.input_ids[0], ref.slice(0, 0, T)));
    ASSERT_TRUE(torch::equal(b.targets[0], ref.slice(0, 1, T + 1)));
    torch::Tensor positions;
    std::vector<int32_t> starts;
    reference_documents(b.input_ids.slice(1, 0, 4096), 0, positions, starts);  // the reference is slow: a prefix
    ASSERT_TRUE(torch::equal(b.position_ids.slice(1, 0, 4096), positions));
    EXPECT_GT(b.cu_seqlens.numel(), 100);
    EXPECT_EQ(b.cu_seqlens[-1].item<int32_t>(), int32_t(T));
  }
}

// Runs only where a GPU exists (scripts/gpu-check.sh): pinned buffers, and
// batches copied to the device equal the CPU ones.
TEST_F(DataLoader, CopiesToCudaFromPinnedMemory) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device here";
  SCOPED_TRACE(trace());
  const Corpus c = make_corpus({5000, 3000}, 20);
  data::LoaderOptions o = options_for(c, 64, 4);
  o.document_mode = data::DocumentMode::kDocumentMask;
  o.pin_memory = false;
  data::StreamingContextDataLoader cpu(o);
  o.pin_memory = std::nullopt;  // default: pinned when CUDA is available
  data::StreamingContextDataLoader pinned(o);
  o.device = torch::Device(torch::kCUDA, 0);
  data::StreamingContextDataLoader gpu(o);
  for (int k = 0; k < 20; ++k) {
    const data::Batch a = cpu.next(), p = pinned.next(), g = gpu.next();
    EXPECT_TRUE(p.input_ids.is_pinned());
    EXPECT_TRUE(g.input_ids.is_cuda() && g.targets.is_cuda() && g.position_ids.is_cuda() && g.cu_seqlens.is_cuda());
    EXPECT_TRUE(same_batch(a, p));
    EXPECT_TRUE(torch::equal(g.input_ids.cpu(), a.input_ids) && torch::equal(g.targets.cpu(), a.targets) &&
                torch::equal(g.position_ids.cpu(), a.position_ids) && torch::equal(g.cu_seqlens.cpu(), a.cu_seqlens));
  }
}

}  // namespace
}  // namespace unswag
