// Trainer tests (CPU, tiny byte-level Llama on a slice of the embedded
// corpus): the loss goes down; save + resume repeats an uninterrupted run's
// losses bit for bit; a save that dies half-way leaves the previous
// checkpoint loadable; gradient accumulation weights tokens, not micro-batches;
// the schedules; the byte tokenizer; the SVG plot; bad options.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "models/file_io.h"
#include "train/train_fs.h"
#include "test_util.h"
#include "unswag/data/tokenizer.h"
#include "unswag/model.h"
#include "unswag/train/data.h"
#include "unswag/train/trainer.h"

namespace {

using unswag::Model;
using unswag::test::expect_error;
using unswag::test::TempDir;
namespace train = unswag::train;

// The first `bytes` bytes of the embedded corpus, tokenised to byte shards
// (5% held out) under dir/data; the tokenizer under dir/tokenizer.
train::PreparedData tiny_data(const TempDir& dir, int64_t bytes) {
  std::ifstream in(unswag::test::source_path("data/corpus/devils_dictionary.txt"), std::ios::binary);
  std::string text(size_t(bytes), '\0');
  in.read(text.data(), bytes);
  text.resize(size_t(in.gcount()));
  std::ofstream(dir / "corpus.txt", std::ios::binary) << text;
  train::write_byte_tokenizer(dir / "tokenizer");
  return train::prepare_data({dir / "corpus.txt"}, dir / "tokenizer", dir / "data", 0.05, /*quiet=*/true);
}

Model tiny_model(uint64_t seed) { return Model::from_config(train::small_llama_config(64, 2, 32), {}, seed); }

train::TrainerOptions tiny_options(const train::PreparedData& data, const std::string& out) {
  train::TrainerOptions o;
  o.tokenizer = data.train[0].substr(0, data.train[0].rfind("/data/")) + "/tokenizer";
  o.train_inputs = data.train;
  o.eval_inputs = data.eval;
  o.context = 32;
  o.micro_batch = 4;
  o.steps = 30;
  o.lr = 1e-2;
  o.warmup = 3;
  o.progress = false;
  o.out_dir = out;
  o.seed = 3;
  return o;
}

TEST(Trainer, FewStepsLowerTheLoss) {
  TempDir dir("trainer");
  const auto data = tiny_data(dir, 40000);
  auto o = tiny_options(data, dir / "out");
  o.log_every = 1;
  o.eval_every = 15;
  train::Trainer trainer(tiny_model(1), o);
  const double eval_before = trainer.evaluate();
  const auto result = trainer.fit();
  ASSERT_EQ(result.history.size(), 30u);
  const double first = result.history.front().loss;
  double last5 = 0;
  for (size_t i = 25; i < 30; ++i) last5 += result.history[i].loss / 5;
  // Random init starts near ln(264) = 5.58 nats; 30 updates reach the byte
  // unigram level (~3.3) at least.
  EXPECT_GT(first, 5.0);
  EXPECT_LT(last5, first - 1.5) << "first " << first << " last-5 mean " << last5;
  ASSERT_TRUE(result.history.back().eval_loss.has_value());
  EXPECT_LT(*result.history.back().eval_loss, eval_before - 1.5);
  // What fit() leaves behind.
  for (const char* f : {"metrics.jsonl", "loss.svg", "final/model.safetensors", "final/config.json",
                        "final/tokenizer.json", "checkpoint-30/trainer_state.json", "checkpoint-30/optimizer.safetensors"}) {
    EXPECT_TRUE(unswag::io::exists(dir / ("out/" + std::string(f)))) << f;
  }
  std::ifstream metrics(dir / "out/metrics.jsonl");
  int64_t lines = 0;
  for (std::string line; std::getline(metrics, line);) ++lines;
  EXPECT_EQ(lines, 30);
  // The final model is the trained one.
  Model reloaded = Model::from_pretrained(dir / "out/final");
  for (const auto& [name, p] : trainer.model().named_parameters()) {
    bool found = false;
    for (const auto& [n2, q] : reloaded.named_parameters()) {
      if (n2 == name) {
        found = true;
        EXPECT_TRUE(unswag::test::bitwise_equal(p.detach(), q.detach())) << name;
      }
    }
    EXPECT_TRUE(found) << name;
  }
}

// Runs `steps` updates and returns their losses.
std::vector<double> losses_of(train::Trainer& t, int64_t steps) {
  std::vector<double> out;
  for (int64_t i = 0; i < steps; ++i) out.push_back(t.train_step().loss);
  return out;
}

class TrainerResume : public ::testing::TestWithParam<std::string> {};

TEST_P(TrainerResume, SaveThenResumeRepeatsTheLossesBitForBit) {
  TempDir dir("trainer");
  const auto data = tiny_data(dir, 30000);
  auto o = tiny_options(data, dir / "out");
  o.optimizer = GetParam();
  o.grad_accum = 2;
  o.steps = 8;
  o.eval_inputs.clear();
  std::vector<double> uninterrupted;
  {
    train::Trainer a(tiny_model(5), o);
    uninterrupted = losses_of(a, 8);
  }
  std::vector<double> resumed;
  {
    auto o1 = o;
    o1.out_dir = dir / "out1";
    train::Trainer b(tiny_model(5), o1);
    resumed = losses_of(b, 3);
    b.save_checkpoint();
    b.train_step();  // work after the checkpoint that a crash would lose
  }
  {
    auto o1 = o;
    o1.out_dir = dir / "out1";
    // A different initialisation: everything must come from the checkpoint.
    train::Trainer c(tiny_model(99), o1);
    c.resume("latest");
    EXPECT_EQ(c.step(), 3);
    EXPECT_EQ(c.tokens_seen(), 3 * 2 * 4 * 32);
    const auto rest = losses_of(c, 5);
    resumed.insert(resumed.end(), rest.begin(), rest.end());
  }
  ASSERT_EQ(resumed.size(), uninterrupted.size());
  for (size_t i = 0; i < resumed.size(); ++i) {
    EXPECT_EQ(resumed[i], uninterrupted[i]) << "update " << i + 1 << " (" << GetParam() << ")";
  }
}
INSTANTIATE_TEST_SUITE_P(Optimizers, TrainerResume, ::testing::Values("adamw8bit", "adamw"));

TEST(Trainer, DeathMidSaveLeavesThePreviousCheckpointLoadable) {
  TempDir dir("trainer");
  const auto data = tiny_data(dir, 20000);
  auto o = tiny_options(data, dir / "out");
  o.steps = 6;
  o.eval_inputs.clear();
  std::vector<double> after_two;
  {
    train::Trainer t(tiny_model(2), o);
    losses_of(t, 2);
    t.save_checkpoint();
    after_two = losses_of(t, 1);
    // The process "dies" after the new checkpoint's files are half written:
    // a truncated safetensors file in the temporary directory, no rename.
    t.before_commit_hook = [](const std::string& tmp) {
      std::ofstream(tmp + "/model.safetensors", std::ios::trunc) << "garbage";
      throw std::runtime_error("killed");
    };
    EXPECT_THROW(t.save_checkpoint(), std::runtime_error);
  }
  EXPECT_EQ(train::latest_checkpoint(dir / "out"), dir / "out/checkpoint-2");
  EXPECT_FALSE(unswag::io::exists(dir / "out/checkpoint-3"));
  Model m = Model::from_pretrained(dir / "out/checkpoint-2");
  EXPECT_EQ(m.num_parameters(), tiny_model(0).num_parameters());
  // Resuming from it continues as if the lost update never happened, and the
  // dead save's temporary directory is cleaned up.
  train::Trainer t(tiny_model(7), o);
  t.resume("latest");
  EXPECT_EQ(losses_of(t, 1), after_two);
  for (const auto& name : unswag::train::fs::list_dir(dir / "out")) EXPECT_NE(name.rfind(".tmp-", 0), 0u) << name;
}

TEST(Trainer, KeepsTheLastKCheckpoints) {
  TempDir dir("trainer");
  const auto data = tiny_data(dir, 20000);
  auto o = tiny_options(data, dir / "out");
  o.steps = 5;
  o.save_every = 1;
  o.keep_last = 2;
  o.save_final = false;
  o.eval_inputs.clear();
  train::Trainer t(tiny_model(2), o);
  t.fit();
  EXPECT_FALSE(unswag::io::exists(dir / "out/checkpoint-3"));
  EXPECT_TRUE(unswag::io::exists(dir / "out/checkpoint-4/trainer_state.json"));
  EXPECT_TRUE(unswag::io::exists(dir / "out/checkpoint-5/trainer_state.json"));
  EXPECT_EQ(train::latest_checkpoint(dir / "out"), dir / "out/checkpoint-5");
}

// Accumulating micro-batches with different numbers of ignored targets gives
// the gradients of the one batch that holds them all (token-weighted mean),
// which differ from the mean of per-micro-batch means.
TEST(Trainer, GradientAccumulationWeightsTokensNotMicroBatches) {
  const uint64_t seed = unswag::test::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  torch::manual_seed(seed);
  const int64_t T = 13;
  auto ids = torch::randint(0, 257, {3, T + 1}, torch::kLong);
  auto input = ids.narrow(1, 0, T), targets = ids.narrow(1, 1, T).clone();
  targets.index_put_({0, torch::indexing::Slice(0, 10)}, -100);  // row 0: 3 targets; rows 1-2: 13 each
  Model a = tiny_model(11), b = tiny_model(11), c = tiny_model(11);
  for (Model* m : {&a, &b, &c}) m->for_training({});
  const auto whole = train::accumulate_gradients(a, {{input, targets}});
  const auto split = train::accumulate_gradients(
      b, {{input.narrow(0, 0, 1), targets.narrow(0, 0, 1)}, {input.narrow(0, 1, 2), targets.narrow(0, 1, 2)}});
  EXPECT_NEAR(split.item<double>(), whole.item<double>(), 1e-5 * whole.item<double>());
  // Mean of means, for contrast.
  auto l0 = c.loss(input.narrow(0, 0, 1), targets.narrow(0, 0, 1)), l1 = c.loss(input.narrow(0, 1, 2), targets.narrow(0, 1, 2));
  ((l0 + l1) / 2).backward();
  const auto pa = a.named_parameters(), pb = b.named_parameters(), pc = c.named_parameters();
  double worst = 0, mean_of_means_err = 0;
  for (size_t i = 0; i < pa.size(); ++i) {
    worst = std::max(worst, unswag::test::rel_l2(pb[i].second.grad(), pa[i].second.grad()));
    mean_of_means_err = std::max(mean_of_means_err, unswag::test::rel_l2(pc[i].second.grad(), pa[i].second.grad()));
  }
  EXPECT_LT(worst, 1e-5);               // fp32 summation-order differences only
  EXPECT_GT(mean_of_means_err, 1e-2);   // the test can tell the two apart
}

// The Trainer with grad_accum 2 x micro-batch 1 takes the same windows and
// makes the same update as grad_accum 1 x micro-batch 2.
TEST(Trainer, AccumulationMatchesALargerBatch) {
  TempDir dir("trainer");
  const auto data = tiny_data(dir, 20000);
  auto o = tiny_options(data, dir / "a");
  o.optimizer = "adamw";
  o.eval_inputs.clear();
  o.micro_batch = 2;
  o.grad_accum = 1;
  train::Trainer big(tiny_model(4), o);
  o.out_dir = dir / "b";
  o.micro_batch = 1;
  o.grad_accum = 2;
  train::Trainer accum(tiny_model(4), o);
  for (int i = 0; i < 2; ++i) {
    const auto m1 = big.train_step(), m2 = accum.train_step();
    EXPECT_NEAR(m1.loss, m2.loss, 1e-5 * m1.loss);
    EXPECT_NEAR(m1.grad_norm, m2.grad_norm, 1e-4 * m1.grad_norm);
  }
  const auto p1 = big.model().named_parameters(), p2 = accum.model().named_parameters();
  for (size_t i = 0; i < p1.size(); ++i) EXPECT_LT(unswag::test::rel_l2(p2[i].second, p1[i].second), 1e-5) << p1[i].first;
}

TEST(Trainer, EvaluateIsTheTokenWeightedMeanOverHeldOutWindows) {
  TempDir dir("trainer");
  const auto data = tiny_data(dir, 20000);  // 1000 held-out tokens: 31 windows of 32
  auto o = tiny_options(data, dir / "out");
  o.eval_batches = 3;
  train::Trainer t(tiny_model(8), o);
  // Reference: the first 3 x 4 consecutive windows of the eval stream.
  Model& m = t.model();
  const auto shard_tokens = [&] {
    std::ifstream in(data.eval[0], std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto* p = reinterpret_cast<const uint16_t*>(bytes.data() + 256);
    std::vector<int64_t> v((bytes.size() - 256) / 2);
    for (size_t i = 0; i < v.size(); ++i) v[i] = p[i];
    return torch::tensor(v);
  }();
  double sum = 0;
  torch::NoGradGuard g;
  for (int64_t w = 0; w < 12; ++w) {
    const auto win = shard_tokens.narrow(0, w * 32, 33).unsqueeze(0);
    sum += m.loss(win.narrow(1, 0, 32), win.narrow(1, 1, 32)).item<double>();
  }
  EXPECT_NEAR(t.evaluate(), sum / 12, 1e-5 * sum / 12);
}

TEST(Trainer, Schedules) {
  using train::learning_rate;
  using train::Schedule;
  const double peak = 1e-3, ratio = 0.1;
  // Warmup: peak (s + 1) / warmup.
  for (int64_t s = 0; s < 10; ++s) EXPECT_DOUBLE_EQ(learning_rate(Schedule::kCosine, peak, s, 10, 110, ratio), peak * (s + 1) / 10);
  for (Schedule sch : {Schedule::kCosine, Schedule::kLinear}) {
    EXPECT_DOUBLE_EQ(learning_rate(sch, peak, 10, 10, 110, ratio), peak);
    EXPECT_NEAR(learning_rate(sch, peak, 60, 10, 110, ratio), (peak + peak * ratio) / 2, 1e-15);  // midpoint
    EXPECT_NEAR(learning_rate(sch, peak, 110, 10, 110, ratio), peak * ratio, 1e-15);
    double prev = 1;
    for (int64_t s = 10; s <= 110; ++s) {
      const double lr = learning_rate(sch, peak, s, 10, 110, ratio);
      EXPECT_LE(lr, prev);
      prev = lr;
    }
  }
  // Cosine at a quarter: min + (peak - min) (1 + cos(pi/4)) / 2.
  EXPECT_NEAR(learning_rate(Schedule::kCosine, peak, 35, 10, 110, ratio),
              peak * ratio + peak * (1 - ratio) * (1 + std::sqrt(0.5)) / 2, 1e-15);
  EXPECT_NEAR(learning_rate(Schedule::kLinear, peak, 35, 10, 110, ratio), peak - peak * (1 - ratio) * 0.25, 1e-15);
  EXPECT_DOUBLE_EQ(learning_rate(Schedule::kConstant, peak, 90, 10, 110, ratio), peak);
  EXPECT_EQ(train::parse_schedule("linear"), Schedule::kLinear);
  expect_error([] { train::parse_schedule("step"); }, {"schedule", "cosine", "\"step\""});
}

TEST(Trainer, ByteTokenizerRoundTripsEveryByte) {
  TempDir dir("trainer");
  train::write_byte_tokenizer(dir.path());
  const auto tok = unswag::data::Tokenizer::from_file(dir.path());
  EXPECT_EQ(tok.vocab_size(), train::kByteTokenizerVocab);
  EXPECT_EQ(tok.eos_id(), std::optional<int32_t>(256));
  const std::string text = "ABSURDITY, n.  A statement or belief manifestly inconsistent with one's own opinion.\n"
                           "\t  caf\xc3\xa9 \xe2\x82\xac 12345 \xf0\x9f\x98\x80<|endoftext|>";
  const auto ids = tok.encode(text, false);
  // The reference: the UTF-8 bytes themselves, the special token as 256.
  const std::string plain = text.substr(0, text.size() - 13);
  ASSERT_EQ(ids.size(), plain.size() + 1);
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_EQ(ids[i], int32_t(uint8_t(plain[i]))) << i;
  EXPECT_EQ(ids.back(), 256);
  EXPECT_EQ(tok.decode(ids), text);
}

TEST(Trainer, LossCurveSvg) {
  std::vector<train::StepMetrics> h;
  for (int i = 1; i <= 7; ++i) {
    train::StepMetrics m;
    m.step = i;
    m.tokens = i * 1000;
    m.loss = 5.0 / i;
    if (i % 3 == 0) m.eval_loss = 5.5 / i;
    h.push_back(m);
  }
  const std::string svg = train::loss_curve_svg(h, "a <title> & more");
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  EXPECT_NE(svg.find("a &lt;title&gt; &amp; more"), std::string::npos);
  auto count = [&](const std::string& what) {
    size_t n = 0;
    for (size_t p = svg.find(what); p != std::string::npos; p = svg.find(what, p + 1)) ++n;
    return n;
  };
  EXPECT_EQ(count("<polyline"), 2u);  // train and eval
  EXPECT_EQ(count("<circle"), 2u);    // eval points at steps 3 and 6
  // 7 train points in the first polyline.
  const size_t a = svg.find("points=\"") + 8, b = svg.find('"', a);
  std::istringstream pts(svg.substr(a, b - a));
  int n = 0;
  for (std::string p; pts >> p;) ++n;
  EXPECT_EQ(n, 7);
  EXPECT_EQ(train::loss_curve_svg({}, "empty").rfind("<svg", 0), 0u);
}

TEST(Trainer, BadOptions) {
  TempDir dir("trainer");
  const auto data = tiny_data(dir, 3000);
  auto o = tiny_options(data, dir / "out");
  o.context = 5000;
  const std::string has = "has " + std::to_string(data.train_tokens) + " tokens";
  expect_error([&] { train::Trainer(tiny_model(0), o); }, {"context 5000", "longer than the data", has.c_str()});
  o = tiny_options(data, dir / "out");
  o.optimizer = "sgd";
  expect_error([&] { train::Trainer(tiny_model(0), o); }, {"optimizer", "sgd"});
  o = tiny_options(data, "");
  expect_error([&] { train::Trainer(tiny_model(0), o); }, {"out_dir"});
  o = tiny_options(data, dir / "out");
  train::Trainer t(tiny_model(0), o);
  expect_error([&] { t.resume("latest"); }, {"no checkpoint", "out"});
  expect_error([&] { t.resume(dir / "nope"); }, {"not a trainer checkpoint"});
}

}  // namespace
