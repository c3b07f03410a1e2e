// The pretraining loop end to end on the CPU backend, with a tiny model (d_model 32, 2 layers,
// sequences of 16 tokens) so that each test takes well under a second or two:
//   - the loss falls on the demo data and the validation loss ends well below ln(vocab);
//   - gradient accumulation (4 x 2) matches the big batch (8 x 1) to fp32 rounding;
//   - weight decay shrinks matrices and embeddings by exactly (1 - lr wd) and leaves norms and biases;
//   - a run stopped half-way and resumed from its checkpoint continues bit for bit;
//   - bad checkpoints, optimizer switches, non-finite losses and bad data are refused with clear errors;
//   - metrics.jsonl has the documented entries; every optimizer runs (Sophia with its Hessian pass).
#include <gtest/gtest.h>

#include <unistd.h>
#include "kernels/cuda_runtime.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "data/byte_tokenizer.h"
#include "data/loader.h"
#include "kernels/cuda_runtime.h"
#include "train/checkpoint.h"
#include "train/cpu_backend.h"
#include "train/schedule.h"
#include "train/train_config.h"
#include "train/trainer.h"

namespace {

namespace fs = std::filesystem;
using llm::Checkpoint;
using llm::CheckpointError;
using llm::CpuBackend;
using llm::json;
using llm::RunOptions;
using llm::RunResult;
using llm::TokenBatch;
using llm::TrainBackend;
using llm::TrainConfig;

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "llm_trainer_XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// A tiny model on the arithmetic corpus. Tests change what they need and read it through the config
// reader, so every config is also a valid config file.
json tiny_config(const std::string& output_dir) {
  return {{"model",
           {{"d_model", 32},
            {"n_heads", 4},
            {"n_kv_heads", 2},
            {"d_ff", 64},
            {"n_layers", 2},
            {"vocab_size", 260},
            {"max_seq_len", 16}}},
          {"datasets", {"builtin:arithmetic"}},
          {"val_fraction", 0.05},
          {"optimizer", "adamw"},
          {"lr", 3e-3},
          {"weight_decay", 0.1},
          {"scheduler", "cosine"},
          {"warmup_steps", 5},
          {"min_lr_ratio", 0.1},
          {"max_steps", 60},
          {"batch_size", 4},
          {"gradient_accumulation_steps", 1},
          {"grad_clip", 1.0},
          {"log_every", 1},
          {"eval_every", 0},
          {"eval_steps", 4},
          {"save_every", 0},
          {"output_dir", output_dir},
          {"seed", 42},
          {"device", "cpu"}};
}

TrainConfig read_config(const json& object) {
  return llm::train_config_from_json(object, "test config");
}

// The datasets, loaded once per process (the arithmetic corpus is the same every time).
std::vector<std::shared_ptr<const llm::data::TokenDataset>> datasets_of(
    const TrainConfig& config, const llm::data::Tokenizer& tokenizer) {
  static std::map<std::string, std::vector<std::shared_ptr<const llm::data::TokenDataset>>> cache;
  const std::string key = json(config.datasets).dump() + "/" + std::to_string(config.model.vocab_size);
  auto it = cache.find(key);
  if (it == cache.end()) {
    llm::data::LoadOptions load;
    load.model_vocab_size = config.model.vocab_size;
    it = cache.emplace(key, llm::data::load_datasets(config.datasets, tokenizer, load)).first;
  }
  return it->second;
}

// What run_pretraining builds (prefetching train loader, validation split, CPU backend), kept in the
// open so that a test can look at the backend and wrap it.
struct Pipeline {
  TrainConfig config;
  llm::data::ByteTokenizer tokenizer;
  std::unique_ptr<llm::data::BatchSource> train, val;
  std::unique_ptr<CpuBackend> backend;
  std::unique_ptr<llm::Trainer> trainer;

  explicit Pipeline(const json& object) : config(read_config(object)) {
    const auto sets = datasets_of(config, tokenizer);
    llm::data::LoaderOptions lo;
    lo.B = config.batch_size;
    lo.T = config.resolved_seq_len();
    lo.seed = config.seed;
    lo.val_fraction = config.val_fraction;
    lo.split = llm::data::Split::kTrain;
    train = std::make_unique<llm::data::PrefetchLoader>(std::make_unique<llm::data::PretrainLoader>(sets, lo),
                                                        config.prefetch);
    if (config.val_fraction > 0.0) {
      llm::data::LoaderOptions vo = lo;
      vo.split = llm::data::Split::kValidation;
      val = std::make_unique<llm::data::PretrainLoader>(sets, vo);
    }
    llm::BackendOptions bo;
    bo.max_batch = config.batch_size;
    bo.max_seq = config.resolved_seq_len();
    bo.seed = config.seed;
    bo.weight_decay = config.weight_decay;
    backend = std::make_unique<CpuBackend>(config.model, config.optimizer, bo);
  }

  // Runs through `via` (a wrapper around the backend) when given.
  RunResult run(RunOptions options = {}, TrainBackend* via = nullptr) {
    options.print = false;
    trainer = std::make_unique<llm::Trainer>(config, via ? *via : *backend, *train, val.get(), tokenizer);
    return trainer->run(options);
  }
};

// Passes every call through to a real backend, and can inject faults: a non-finite loss or gradient
// norm, or a crash (an exception, as if the process died) at a given forward_backward call (counted
// from 1 over the backend's life).
class FaultyBackend : public TrainBackend {
 public:
  explicit FaultyBackend(TrainBackend& inner) : inner_(inner) {}

  int64_t nan_loss_at_call = -1, inf_norm_at_call = -1, crash_at_call = -1;
  int64_t poison_at_step = -1;  // the update of this optimizer step leaves a NaN in the weights
  int64_t calls = 0, hessian_updates = 0;
  std::vector<int64_t> optimizer_steps;  // the step argument of every optimizer_step

  std::string name() const override { return inner_.name(); }
  const llm::ParameterLayout& layout() const override { return inner_.layout(); }
  llm::MemoryPlan memory_plan() const override { return inner_.memory_plan(); }
  double forward_backward(const TokenBatch& batch, double grad_scale, uint64_t dropout_counter) override {
    ++calls;
    if (calls == crash_at_call) throw std::runtime_error("simulated crash");
    const double loss = inner_.forward_backward(batch, grad_scale, dropout_counter);
    return calls == nan_loss_at_call ? std::nan("") : loss;
  }
  double evaluate(const TokenBatch& batch) override { return inner_.evaluate(batch); }
  std::vector<float> next_token_logits(const std::vector<int32_t>& tokens) override {
    return inner_.next_token_logits(tokens);
  }
  void zero_grad() override { inner_.zero_grad(); }
  double grad_norm() override {
    return calls == inf_norm_at_call ? std::numeric_limits<double>::infinity() : inner_.grad_norm();
  }
  void scale_grads(double factor) override { inner_.scale_grads(factor); }
  void optimizer_step(double lr, int64_t step) override {
    optimizer_steps.push_back(step);
    inner_.optimizer_step(lr, step);
    if (step == poison_at_step) {
      std::vector<float> params = inner_.read_parameters();
      params[params.size() / 2] = std::nanf("");
      inner_.write_parameters(params);
    }
  }
  bool wants_hessian_estimate(int64_t step) const override { return inner_.wants_hessian_estimate(step); }
  void update_hessian_estimate(const TokenBatch& batch, int batch_tokens, uint64_t sample_counter) override {
    ++hessian_updates;
    inner_.update_hessian_estimate(batch, batch_tokens, sample_counter);
  }
  std::vector<float> read_parameters() override { return inner_.read_parameters(); }
  void write_parameters(const std::vector<float>& values) override { inner_.write_parameters(values); }
  std::vector<llm::StateBuffer> optimizer_state() override { return inner_.optimizer_state(); }
  void load_optimizer_state(const std::vector<llm::StateBuffer>& state) override {
    inner_.load_optimizer_state(state);
  }
  std::string optimizer_name() const override { return inner_.optimizer_name(); }

 private:
  TrainBackend& inner_;
};

std::vector<json> read_metrics(const std::string& file) {
  std::ifstream in(file);
  std::vector<json> lines;
  std::string line;
  while (std::getline(in, line)) lines.push_back(json::parse(line));
  return lines;
}

// The values of `key` in the metric lines that have it, in order.
std::vector<double> metric(const std::vector<json>& lines, const std::string& key) {
  std::vector<double> values;
  for (const auto& l : lines) {
    if (l.contains(key)) values.push_back(l[key].get<double>());
  }
  return values;
}

double mean(const std::vector<double>& v, size_t begin, size_t end) {
  return std::accumulate(v.begin() + begin, v.begin() + end, 0.0) / static_cast<double>(end - begin);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

std::vector<float> checkpoint_parameters(const std::string& file) {
  const Checkpoint ck = llm::read_checkpoint(file, false);
  std::vector<float> all;
  for (const auto& a : ck.arrays) all.insert(all.end(), a.data.begin(), a.data.end());
  return all;
}

TEST(Trainer, LossFallsOnDemoData) {
  TempDir dir;
  json object = tiny_config(dir / "out");
  object["max_steps"] = 60;
  Pipeline s(object);
  const RunResult r = s.run();
  ASSERT_EQ(r.losses.size(), 60u);
  ASSERT_FALSE(r.stopped_on_nonfinite);
  const double ln_vocab = std::log(260.0);
  // At initialisation (weights ~ N(0, 0.02)) the logits are nearly uniform.
  EXPECT_NEAR(r.losses[0], ln_vocab, 0.1);
  const double first = mean(r.losses, 0, 5), last = mean(r.losses, 55, 60);
  EXPECT_LT(last, first - 2.0) << "first 5 steps " << first << ", last 5 steps " << last;
  // The validation loss at the end (always evaluated at the last step).
  ASSERT_TRUE(std::isfinite(r.last_val_loss));
  EXPECT_LT(r.last_val_loss, ln_vocab - 2.0) << "val loss " << r.last_val_loss;
  EXPECT_EQ(r.best_val_loss, r.last_val_loss);
  EXPECT_EQ(r.start_step, 0);
  EXPECT_EQ(r.final_step, 60);
  EXPECT_EQ(r.last_checkpoint, dir / "out/latest.ckpt");
  EXPECT_TRUE(fs::exists(dir / "out/best.ckpt"));
  // Greedy samples run, also past the model's 16-token window, and are deterministic.
  const std::string sample = s.trainer->generate("12+35=47\n7*8=", 12, 0);
  EXPECT_EQ(sample, s.trainer->generate("12+35=47\n7*8=", 12, 0));
  EXPECT_FALSE(sample.empty());
}

// Masks targets by content, as completion-only SFT does: a row whose first input token is even keeps
// only its last 4 targets, so micro-batches of one step carry very different numbers of targets.
class MaskingSource : public llm::data::BatchSource {
 public:
  explicit MaskingSource(std::unique_ptr<llm::data::BatchSource> inner) : inner_(std::move(inner)) {}
  llm::data::Batch next() override {
    llm::data::Batch b = inner_->next();
    for (int r = 0; r < b.B; ++r) {
      if (b.inputs[static_cast<size_t>(r) * b.T] % 2 != 0) continue;
      for (int t = 0; t < b.T - 4; ++t) b.targets[static_cast<size_t>(r) * b.T + t] = -100;
    }
    return b;
  }
  json state() const override { return inner_->state(); }
  void restore(const json& state) override { inner_->restore(state); }
  void reset() override { inner_->reset(); }

 private:
  std::unique_ptr<llm::data::BatchSource> inner_;
};

void check_accumulation_equivalence(bool masked);

TEST(Trainer, GradientAccumulationEquivalence) {
  // Batch 4 x 2 micro-batches against batch 8 x 1: the loader serves the same 8 rows per step (rows are
  // consecutive windows of one stream), every row has all 16 targets, so the mean of the two half-batch
  // means is the mean over the 8 rows, and the accumulated gradient (each half scaled by 1/2) is the
  // big batch's gradient. Only the order of fp32 sums differs: per-step losses and the final weights
  // agree to about 1e-6 relative; 1e-5 leaves a margin for the few steps of AdamW compounding it.
  // With masked targets the step's loss is still the mean over the step's targets: each micro-batch's
  // mean counts by its share of them (the mean of the two means fails this check).
  for (const bool masked : {false, true}) {
    SCOPED_TRACE(masked ? "masked targets" : "every target");
    check_accumulation_equivalence(masked);
  }
}

void check_accumulation_equivalence(bool masked) {
  TempDir dir;
  auto run = [&](int batch, int accumulation) {
    const std::string out = dir / ("out" + std::to_string(batch));
    json object = tiny_config(out);
    object["batch_size"] = batch;
    object["gradient_accumulation_steps"] = accumulation;
    object["max_steps"] = 4;
    object["warmup_steps"] = 0;
    object["lr"] = 1e-3;
    object["val_fraction"] = 0.0;
    auto s = std::make_unique<Pipeline>(object);
    if (masked) s->train = std::make_unique<MaskingSource>(std::move(s->train));
    RunResult r = s->run();
    return std::make_tuple(r.losses, metric(read_metrics(out + "/metrics.jsonl"), "grad_norm"),
                           s->backend->read_parameters());
  };
  const auto [losses_a, norms_a, params_a] = run(4, 2);
  const auto [losses_b, norms_b, params_b] = run(8, 1);
  ASSERT_EQ(losses_a.size(), 4u);
  ASSERT_EQ(losses_b.size(), 4u);
  ASSERT_EQ(norms_a.size(), 4u);
  ASSERT_EQ(norms_b.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_NEAR(losses_a[i], losses_b[i], 1e-5 * std::fabs(losses_b[i])) << "step " << i + 1;
    // The gradient norm (before clipping) checks the gradient's scale, which AdamW's update would hide.
    EXPECT_NEAR(norms_a[i], norms_b[i], 1e-5 * std::fabs(norms_b[i])) << "step " << i + 1;
  }
  ASSERT_EQ(params_a.size(), params_b.size());
  // Parameters start at ~0.02 and move by ~lr per step; compare relative to max(|p|, 1e-2) so that
  // entries passing near zero are held to an absolute 1e-7.
  double worst = 0.0;
  size_t worst_index = 0;
  for (size_t i = 0; i < params_a.size(); ++i) {
    const double err = std::fabs(static_cast<double>(params_a[i]) - params_b[i]) /
                       std::max(1e-2, std::fabs(static_cast<double>(params_b[i])));
    if (err > worst) {
      worst = err;
      worst_index = i;
    }
  }
  EXPECT_LT(worst, 1e-5) << "parameter " << worst_index << ": " << params_a[worst_index] << " vs "
                         << params_b[worst_index];
  // And the two are not trivially equal because nothing happened.
  Pipeline fresh(tiny_config(dir / "fresh"));
  EXPECT_FALSE(same_bits(fresh.backend->read_parameters(), params_b));
}

TEST(Trainer, WeightDecaySkipsNormsAndBiases) {
  // With zero gradients AdamW's step is the decay alone: w <- w - lr wd w for decayed tensors, nothing
  // for norms and biases. LayerNorm and attention_bias give the model biases of both kinds.
  json model = tiny_config("unused")["model"];
  model["norm_type"] = "layernorm";
  model["attention_bias"] = true;
  model["tie_word_embeddings"] = false;  // a separate head tensor too
  const llm::ModelConfig config = llm::model_config_from_json(model, "model");
  const double lr = 0.01, wd = 0.1;
  auto check = [&](const std::vector<std::string>& no_decay, const std::vector<std::string>& decay,
                   auto expect_decayed) {
    llm::OptimizerConfig optimizer;
    llm::BackendOptions bo;
    bo.max_batch = 1;
    bo.max_seq = 16;
    bo.weight_decay = wd;
    bo.no_decay_names = no_decay;
    bo.decay_names = decay;
    CpuBackend backend(config, optimizer, bo);
    // Non-zero values everywhere (biases start at zero, which any decay would leave at zero).
    std::vector<float> before = backend.read_parameters();
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.0f, 0.5f);
    for (float& v : before) v = normal(rng);
    backend.write_parameters(before);
    backend.zero_grad();
    EXPECT_EQ(backend.grad_norm(), 0.0);
    backend.optimizer_step(lr, 1);
    const std::vector<float> after = backend.read_parameters();
    int decayed = 0, kept = 0;
    for (const auto& t : backend.layout().tensors()) {
      const bool decay = expect_decayed(t);
      for (size_t i = t.offset; i < t.offset + static_cast<size_t>(t.numel); ++i) {
        const double w = before[i];
        const float expected = decay ? static_cast<float>(w - lr * wd * w) : before[i];
        ASSERT_EQ(after[i], expected)
            << t.name << " (" << llm::role_name(t.role) << ") element " << i - t.offset;
      }
      if (decay) {
        ++decayed;
        EXPECT_NE(after[t.offset], before[t.offset]) << t.name;
      } else {
        ++kept;
      }
    }
    EXPECT_GT(decayed, 0);
    EXPECT_GT(kept, 0);
  };
  using llm::TensorInfo;
  using llm::TensorRole;
  auto by_role = [](const TensorInfo& t) {
    return t.role != TensorRole::kNorm && t.role != TensorRole::kBias;
  };
  check({}, {}, by_role);
  // The roles are what we think they are for this model.
  {
    llm::OptimizerConfig optimizer;
    llm::BackendOptions bo;
    bo.max_seq = 16;
    CpuBackend backend(config, optimizer, bo);
    const auto& layout = backend.layout();
    EXPECT_EQ(layout.at("model.layers.0.input_layernorm.weight").role, TensorRole::kNorm);
    EXPECT_EQ(layout.at("model.layers.0.input_layernorm.bias").role, TensorRole::kBias);
    EXPECT_EQ(layout.at("model.layers.0.self_attn.q_proj.bias").role, TensorRole::kBias);
    EXPECT_EQ(layout.at("model.layers.0.self_attn.q_proj.weight").role, TensorRole::kMatrix);
    EXPECT_EQ(layout.at("model.embed_tokens.weight").role, TensorRole::kEmbedding);
    EXPECT_EQ(layout.at("lm_head.weight").role, TensorRole::kHead);
  }
  // The name overrides: no decay on the embedding, decay on the final norm.
  check({"embed_tokens"}, {"model.norm."}, [&](const TensorInfo& t) {
    if (t.name == "model.embed_tokens.weight") return false;
    if (t.name.rfind("model.norm.", 0) == 0) return true;
    return by_role(t);
  });
}

// A resumable run: dropout on (so the RNG counter matters), accumulation 2 (so the micro-step does),
// evaluation and checkpoints every 4 steps, prefetching loader.
json resume_config(const std::string& output_dir) {
  json object = tiny_config(output_dir);
  object["model"]["dropout"] = 0.1;
  object["batch_size"] = 2;
  object["gradient_accumulation_steps"] = 2;
  object["max_steps"] = 8;
  object["warmup_steps"] = 2;
  object["eval_every"] = 4;
  object["save_every"] = 4;
  object["prefetch"] = 2;
  return object;
}

TEST(Trainer, ResumeIsBitwiseEqual) {
  TempDir dir;
  // Straight through: 8 steps.
  Pipeline straight(resume_config(dir / "a"));
  const RunResult ra = straight.run();
  ASSERT_EQ(ra.losses.size(), 8u);
  const std::vector<float> final_a = straight.backend->read_parameters();

  // The same run dies during step 6, after latest.ckpt was written at step 4 and step 5 was logged...
  {
    Pipeline first(resume_config(dir / "b"));
    FaultyBackend crashing(*first.backend);
    crashing.crash_at_call = 5 * 2 + 2;  // the second micro-batch of step 6
    EXPECT_THROW(first.run({}, &crashing), std::runtime_error);
  }
  ASSERT_EQ(llm::read_checkpoint(dir / "b/latest.ckpt").meta["step"], 4);
  ASSERT_EQ(read_metrics(dir / "b/metrics.jsonl").back()["step"], 5);
  std::ofstream(dir / "b/metrics.jsonl", std::ios::app) << "{\"step\": 6, \"loss\": 2.";  // torn by the crash
  // ...and a new process (new backend, new loaders) resumes it.
  Pipeline second(resume_config(dir / "b"));
  FaultyBackend recording(*second.backend);
  RunOptions resume;
  resume.resume_path = dir / "b/latest.ckpt";
  const RunResult rb = second.run(resume, &recording);
  EXPECT_EQ(recording.optimizer_steps, std::vector<int64_t>({5, 6, 7, 8}));
  EXPECT_EQ(rb.start_step, 4);
  EXPECT_EQ(rb.final_step, 8);
  ASSERT_EQ(rb.losses.size(), 4u);
  const std::vector<double> tail_a(ra.losses.begin() + 4, ra.losses.end());
  EXPECT_TRUE(same_bits(tail_a, rb.losses));
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(ra.losses[4 + i], rb.losses[i]) << "step " << 5 + i;
  EXPECT_TRUE(same_bits(final_a, second.backend->read_parameters())) << "final weights differ";
  EXPECT_EQ(ra.last_val_loss, rb.last_val_loss);
  EXPECT_EQ(ra.best_val_loss, rb.best_val_loss);

  // The metrics of the two runs agree line for line: steps 1-4 written before the crash, 5-8 after
  // (the crashed run's line for step 5 is replaced by the resumed run's).
  const auto ma = read_metrics(dir / "a/metrics.jsonl"), mb = read_metrics(dir / "b/metrics.jsonl");
  EXPECT_TRUE(same_bits(metric(ma, "loss"), ra.losses));
  EXPECT_TRUE(same_bits(metric(ma, "loss"), metric(mb, "loss")));
  EXPECT_TRUE(same_bits(metric(ma, "grad_norm"), metric(mb, "grad_norm")));
  EXPECT_TRUE(same_bits(metric(ma, "lr"), metric(mb, "lr")));
  EXPECT_TRUE(same_bits(metric(ma, "val_loss"), metric(mb, "val_loss")));
  EXPECT_EQ(metric(ma, "val_loss").size(), 2u);
  EXPECT_TRUE(same_bits(metric(ma, "tokens_seen"), metric(mb, "tokens_seen")));
  EXPECT_TRUE(same_bits(metric(ma, "step"), metric(mb, "step")));
  // The checkpoints at the end are the same too.
  EXPECT_TRUE(
      same_bits(checkpoint_parameters(dir / "a/latest.ckpt"), checkpoint_parameters(dir / "b/latest.ckpt")));

  // Dropout really is on: without it the same run gives other losses.
  json no_dropout = resume_config(dir / "c");
  no_dropout["model"]["dropout"] = 0.0;
  no_dropout["max_steps"] = 1;
  Pipeline plain(no_dropout);
  EXPECT_NE(plain.run().losses.at(0), ra.losses[0]);

  // Training on past the configured max_steps: resume at 8 and go to 12.
  Pipeline third(resume_config(dir / "b"));
  RunOptions longer;
  longer.resume_path = dir / "b/latest.ckpt";
  longer.max_steps_override = 12;
  const RunResult rc = third.run(longer);
  EXPECT_EQ(rc.start_step, 8);
  EXPECT_EQ(rc.final_step, 12);
  ASSERT_EQ(rc.losses.size(), 4u);
  for (double l : rc.losses) EXPECT_TRUE(std::isfinite(l));
  EXPECT_EQ(llm::read_checkpoint(dir / "b/latest.ckpt").meta["step"], 12);
  // Resuming a finished run takes no step.
  Pipeline fourth(resume_config(dir / "b"));
  RunOptions again;
  again.resume_path = dir / "b/latest.ckpt";
  const RunResult rd = fourth.run(again);
  EXPECT_EQ(rd.start_step, 12);
  EXPECT_EQ(rd.final_step, 12);
  EXPECT_TRUE(rd.losses.empty());
}

TEST(Trainer, ResumeIsBitwiseEqualForEveryOptimizer) {
  // Every optimizer's state round-trips through the checkpoint: 4 steps straight against 2, a crash,
  // and a resume. Sophia with k = 2 also resumes its Hessian estimate.
  for (const char* name : {"adamw", "lion", "muon", "adafactor", "adamw_8bit", "sophia"}) {
    SCOPED_TRACE(name);
    TempDir dir;
    auto config = [&](const std::string& out) {
      json object = tiny_config(dir / out);
      object["optimizer"] = name;
      object["sophia_k"] = 2;
      object["lr"] = 1e-3;
      object["batch_size"] = 2;
      object["max_steps"] = 4;
      object["save_every"] = 2;
      object["val_fraction"] = 0.0;
      return object;
    };
    Pipeline straight(config("a"));
    const RunResult ra = straight.run();
    ASSERT_EQ(ra.losses.size(), 4u);
    {
      Pipeline first(config("b"));
      FaultyBackend crashing(*first.backend);
      crashing.crash_at_call = 3;
      EXPECT_THROW(first.run({}, &crashing), std::runtime_error);
    }
    Pipeline second(config("b"));
    RunOptions resume;
    resume.resume_path = dir / "b/latest.ckpt";
    const RunResult rb = second.run(resume);
    EXPECT_TRUE(same_bits(std::vector<double>(ra.losses.begin() + 2, ra.losses.end()), rb.losses));
    EXPECT_TRUE(same_bits(straight.backend->read_parameters(), second.backend->read_parameters()));
  }
}

TEST(Trainer, ResumeWithoutOptimizerState) {
  TempDir dir;
  json object = resume_config(dir / "out");
  object["max_steps"] = 4;
  Pipeline first(object);
  first.run();
  const std::string ckpt = dir / "out/latest.ckpt";
  const std::vector<float> saved = checkpoint_parameters(ckpt);

  // Restoring without the optimizer state: the parameters are the checkpoint's, the state is fresh.
  Pipeline second(object);
  const auto fresh_state = second.backend->optimizer_state();
  llm::Trainer trainer(second.config, *second.backend, *second.train, second.val.get(), second.tokenizer);
  EXPECT_EQ(trainer.restore_checkpoint(ckpt, /*load_optimizer_state=*/false), 4);
  EXPECT_TRUE(same_bits(second.backend->read_parameters(), saved));
  const auto state = second.backend->optimizer_state();
  ASSERT_EQ(state.size(), fresh_state.size());
  for (size_t i = 0; i < state.size(); ++i) EXPECT_TRUE(same_bits(state[i].data, fresh_state[i].data));
  // With it, the state is the saved one.
  Pipeline third(object);
  llm::Trainer with_state(third.config, *third.backend, *third.train, third.val.get(), third.tokenizer);
  with_state.restore_checkpoint(ckpt, true);
  const auto saved_state = third.backend->optimizer_state();
  const Checkpoint ck = llm::read_checkpoint(ckpt);
  size_t k = 0;
  for (const auto& a : ck.arrays) {
    if (a.kind != "optimizer") continue;
    ASSERT_LT(k, saved_state.size());
    EXPECT_EQ(a.name, saved_state[k].name);
    EXPECT_TRUE(same_bits(a.data, saved_state[k].data)) << a.name;
    ++k;
  }
  EXPECT_EQ(k, saved_state.size());

  // And the run continues from there. The fresh optimizer counts its own steps from 1 (AdamW's bias
  // correction of zero moments needs that), while the learning rate follows the global step.
  Pipeline fourth(object);
  FaultyBackend recording(*fourth.backend);
  RunOptions options;
  options.resume_path = ckpt;
  options.load_optimizer_state = false;
  options.max_steps_override = 6;
  const RunResult r = fourth.run(options, &recording);
  EXPECT_EQ(r.start_step, 4);
  EXPECT_EQ(r.final_step, 6);
  ASSERT_EQ(r.losses.size(), 2u);
  for (double l : r.losses) EXPECT_TRUE(std::isfinite(l));
  EXPECT_EQ(recording.optimizer_steps, std::vector<int64_t>({1, 2}));
  const auto lines = read_metrics(dir / "out/metrics.jsonl");
  llm::ScheduleConfig schedule = fourth.config.schedule();
  schedule.total_steps = 6;
  EXPECT_EQ(metric(lines, "lr").back(), llm::learning_rate_at(schedule, 6));
  // Resuming that run with its (now 2-step-old) optimizer state goes on with optimizer step 3.
  EXPECT_EQ(llm::read_checkpoint(ckpt).meta["optimizer_step_offset"], 4);
  Pipeline fifth(object);
  FaultyBackend recording2(*fifth.backend);
  RunOptions more;
  more.resume_path = ckpt;
  more.max_steps_override = 7;
  fifth.run(more, &recording2);
  EXPECT_EQ(recording2.optimizer_steps, std::vector<int64_t>({3}));
}

TEST(Trainer, ResumeWithAnotherOptimizerNeedsNoOptimizerState) {
  TempDir dir;
  json object = resume_config(dir / "out");
  object["max_steps"] = 2;
  object["save_every"] = 2;
  Pipeline first(object);
  first.run();
  const std::string ckpt = dir / "out/latest.ckpt";

  object["optimizer"] = "lion";
  object["lr"] = 3e-4;
  object["max_steps"] = 4;
  Pipeline second(object);
  const std::vector<float> before = second.backend->read_parameters();
  RunOptions options;
  options.resume_path = ckpt;
  try {
    second.run(options);
    FAIL() << "lion resumed from adamw optimizer state";
  } catch (const CheckpointError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(ckpt), std::string::npos) << message;
    EXPECT_NE(message.find("adamw"), std::string::npos) << message;
    EXPECT_NE(message.find("lion"), std::string::npos) << message;
    EXPECT_NE(message.find("load_optimizer_state"), std::string::npos) << message;
  }
  EXPECT_TRUE(same_bits(before, second.backend->read_parameters())) << "refused, yet half-loaded";
  // Without the optimizer state it works.
  Pipeline third(object);
  options.load_optimizer_state = false;
  const RunResult r = third.run(options);
  EXPECT_EQ(r.start_step, 2);
  EXPECT_EQ(r.final_step, 4);
  for (double l : r.losses) EXPECT_TRUE(std::isfinite(l));
  EXPECT_EQ(llm::read_checkpoint(dir / "out/latest.ckpt").meta["optimizer"], "lion");
}

TEST(Trainer, CorruptCheckpointRefusedOnResume) {
  TempDir dir;
  json object = resume_config(dir / "out");
  object["max_steps"] = 2;
  Pipeline first(object);
  first.run();
  const std::string good = dir / "out/latest.ckpt";
  std::string bytes;
  {
    std::ifstream in(good, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  auto damaged = [&](const std::string& name, std::string content) {
    const std::string path = dir / name;
    std::ofstream(path, std::ios::binary).write(content.data(), static_cast<std::streamsize>(content.size()));
    return path;
  };
  std::string flipped = bytes;
  flipped[bytes.size() - 100] ^= 0x04;  // a parameter byte
  const std::vector<std::pair<std::string, std::string>> cases = {
      {damaged("flipped.ckpt", flipped), "corrupted"},
      {damaged("cut.ckpt", bytes.substr(0, bytes.size() / 2)), "truncated"},
  };
  for (const auto& [path, word] : cases) {
    Pipeline s(object);
    const std::vector<float> before = s.backend->read_parameters();
    RunOptions options;
    options.resume_path = path;
    try {
      s.run(options);
      ADD_FAILURE() << path << " was accepted";
    } catch (const CheckpointError& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find(path), std::string::npos) << message;
      EXPECT_NE(message.find(word), std::string::npos) << message;
    }
    // Nothing was half-loaded.
    EXPECT_TRUE(same_bits(before, s.backend->read_parameters()));
  }
  // A sound checkpoint made on other data is refused, naming the file, before anything is loaded.
  {
    const std::string data = dir / "other.jsonl";
    std::ofstream out(data);
    for (int i = 0; i < 30; ++i) out << json{{"text", "document " + std::to_string(i)}}.dump() << "\n";
    out.close();
    json other_data = object;
    other_data["datasets"] = {data};
    Pipeline s(other_data);
    const std::vector<float> before = s.backend->read_parameters();
    RunOptions options;
    options.resume_path = good;
    try {
      s.run(options);
      ADD_FAILURE() << "a checkpoint made on other data was accepted";
    } catch (const CheckpointError& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find(good), std::string::npos) << message;
      EXPECT_NE(message.find("data loader state"), std::string::npos) << message;
    }
    EXPECT_TRUE(same_bits(before, s.backend->read_parameters()));
  }
  // A sound checkpoint of another architecture is refused too.
  json other = object;
  other["model"]["d_ff"] = 96;
  Pipeline s(other);
  RunOptions options;
  options.resume_path = good;
  try {
    s.run(options);
    ADD_FAILURE() << "a checkpoint of another architecture was accepted";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("different model architecture"), std::string::npos) << e.what();
  }
}

TEST(Trainer, NonFiniteLossStopsAndKeepsLastCheckpoint) {
  TempDir dir;
  json object = tiny_config(dir / "out");
  object["max_steps"] = 10;
  object["save_every"] = 2;
  object["val_fraction"] = 0.0;
  for (const bool nan_loss : {true, false}) {
    Pipeline s(object);
    FaultyBackend faulty(*s.backend);
    // Step 5 goes wrong: a NaN loss, or an infinite gradient norm with a finite loss.
    (nan_loss ? faulty.nan_loss_at_call : faulty.inf_norm_at_call) = 5;
    const RunResult r = s.run({}, &faulty);
    EXPECT_TRUE(r.stopped_on_nonfinite);
    EXPECT_EQ(r.final_step, 4);
    EXPECT_EQ(r.losses.size(), 4u);
    const std::string latest = dir / "out/latest.ckpt";
    EXPECT_EQ(r.last_checkpoint, latest);
    // The checkpoint of step 4 is intact, and it is the state the run stopped in: step 5 made no update.
    const Checkpoint ck = llm::read_checkpoint(latest);
    EXPECT_EQ(ck.meta["step"], 4);
    EXPECT_TRUE(same_bits(checkpoint_parameters(latest), s.backend->read_parameters()));
    // No metrics line for the step that failed.
    const auto lines = read_metrics(dir / "out/metrics.jsonl");
    ASSERT_FALSE(lines.empty());
    EXPECT_EQ(lines.back()["step"], 4);
  }
  // The loss and gradients of step 4 are finite, but its update leaves a NaN in the weights: the
  // checkpoint due at step 4 is not written, so latest.ckpt stays the good one of step 2.
  {
    Pipeline s(object);
    FaultyBackend faulty(*s.backend);
    faulty.poison_at_step = 4;
    const RunResult r = s.run({}, &faulty);
    EXPECT_TRUE(r.stopped_on_nonfinite);
    EXPECT_EQ(r.final_step, 4);
    const std::string latest = dir / "out/latest.ckpt";
    EXPECT_EQ(r.last_checkpoint, latest);
    const Checkpoint ck = llm::read_checkpoint(latest);
    EXPECT_EQ(ck.meta["step"], 2);
    for (float v : checkpoint_parameters(latest)) ASSERT_TRUE(std::isfinite(v));
  }
  // A validation loss that is not finite is never the best.
  {
    json with_val = object;
    with_val["val_fraction"] = 0.05;
    with_val["eval_every"] = 2;
    with_val["max_steps"] = 3;
    Pipeline s(with_val);
    FaultyBackend faulty(*s.backend);
    faulty.poison_at_step = 2;
    const RunResult r = s.run({}, &faulty);
    EXPECT_TRUE(r.stopped_on_nonfinite);
    EXPECT_FALSE(fs::exists(dir / "out/best.ckpt"));
    EXPECT_TRUE(std::isnan(r.best_val_loss));
  }
  // A real divergence: an absurd learning rate without clipping overflows within a few steps.
  object["lr"] = 1e30;
  object["grad_clip"] = 0.0;
  object["warmup_steps"] = 0;
  object["save_every"] = 1;
  Pipeline s(object);
  const RunResult r = s.run();
  EXPECT_TRUE(r.stopped_on_nonfinite);
  EXPECT_LT(r.final_step, 10);
  if (r.final_step > 0) {
    EXPECT_EQ(llm::read_checkpoint(r.last_checkpoint).meta["step"], r.final_step);
  }
}

TEST(Trainer, MetricsJsonl) {
  TempDir dir;
  json object = tiny_config(dir / "out");
  object["max_steps"] = 6;
  object["log_every"] = 2;
  object["eval_every"] = 3;
  Pipeline s(object);
  const RunResult r = s.run();
  std::ifstream in(dir / "out/metrics.jsonl");
  std::string line;
  std::vector<int64_t> train_steps, val_steps;
  llm::ScheduleConfig schedule = s.config.schedule();
  while (std::getline(in, line)) {
    const json entry = json::parse(line);  // one JSON object per line
    ASSERT_TRUE(entry.is_object()) << line;
    ASSERT_TRUE(entry.contains("step")) << line;
    const int64_t step = entry["step"].get<int64_t>();
    if (entry.contains("val_loss")) {
      val_steps.push_back(step);
      EXPECT_TRUE(std::isfinite(entry["val_loss"].get<double>()));
      continue;
    }
    train_steps.push_back(step);
    for (const char* key : {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "elapsed_s"}) {
      ASSERT_TRUE(entry.contains(key) && entry[key].is_number()) << key << " missing in " << line;
      EXPECT_TRUE(std::isfinite(entry[key].get<double>())) << line;
    }
    EXPECT_EQ(entry["loss"].get<double>(), r.losses.at(step - 1));
    EXPECT_EQ(entry["lr"].get<double>(), llm::learning_rate_at(schedule, step));
    EXPECT_GT(entry["grad_norm"].get<double>(), 0.0);
    EXPECT_GT(entry["tokens_per_s"].get<double>(), 0.0);
    EXPECT_EQ(entry["tokens_seen"].get<int64_t>(), step * 4 * 16);
  }
  EXPECT_EQ(train_steps, std::vector<int64_t>({2, 4, 6}));
  EXPECT_EQ(val_steps, std::vector<int64_t>({3, 6}));
  // A fresh run starts a new file.
  Pipeline again(object);
  again.run();
  EXPECT_EQ(read_metrics(dir / "out/metrics.jsonl").size(), 5u);
}

TEST(Trainer, SophiaRunsWithHessianPass) {
  TempDir dir;
  json object = tiny_config(dir / "out");
  object["optimizer"] = "sophia";
  object["sophia_k"] = 2;
  object["max_steps"] = 40;
  object["lr"] = 3e-3;
  object["gradient_accumulation_steps"] = 2;
  object["batch_size"] = 2;
  Pipeline s(object);
  FaultyBackend counting(*s.backend);
  const RunResult r = s.run({}, &counting);
  ASSERT_EQ(r.losses.size(), 40u);
  for (double l : r.losses) ASSERT_TRUE(std::isfinite(l));
  EXPECT_EQ(counting.hessian_updates, 20);  // after steps 2, 4, ..., 40
  const double first = mean(r.losses, 0, 5), last = mean(r.losses, 35, 40);
  EXPECT_LT(last, first - 1.5) << "first 5 steps " << first << ", last 5 steps " << last;
}

TEST(Trainer, EveryOptimizerTakesFiniteSteps) {
  for (const char* name : {"adamw", "lion", "muon", "adafactor", "adamw_8bit", "sophia"}) {
    TempDir dir;
    json object = tiny_config(dir / "out");
    object["optimizer"] = name;
    object["max_steps"] = 2;
    object["lr"] = 1e-3;
    object["val_fraction"] = 0.0;
    Pipeline s(object);
    const std::vector<float> before = s.backend->read_parameters();
    const RunResult r = s.run();
    ASSERT_EQ(r.losses.size(), 2u) << name;
    EXPECT_FALSE(r.stopped_on_nonfinite) << name;
    for (double l : r.losses) EXPECT_TRUE(std::isfinite(l)) << name;
    const std::vector<float> after = s.backend->read_parameters();
    EXPECT_FALSE(same_bits(before, after)) << name << " did not change the parameters";
    for (float v : after) ASSERT_TRUE(std::isfinite(v)) << name;
    EXPECT_EQ(llm::read_checkpoint(dir / "out/latest.ckpt").meta["optimizer"], name);
  }
}

TEST(Trainer, BadDataErrors) {
  TempDir dir;
  const std::string file = dir / "data.jsonl";
  {
    std::ofstream out(file);
    for (int i = 0; i < 40; ++i) {
      if (i == 6) {
        out << "{\"txt\": \"no text field\"}\n";  // line 7
      } else {
        out << json{{"text", std::to_string(i) + "+" + std::to_string(i) + "=" + std::to_string(2 * i)}}
                   .dump()
            << "\n";
      }
    }
  }
  json object = tiny_config(dir / "out");
  object["datasets"] = {file};
  object["max_steps"] = 2;
  object["val_fraction"] = 0.1;
  RunOptions options;
  options.print = false;
  try {
    llm::run_pretraining(read_config(object), options);
    FAIL() << "a bad JSONL line was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(file + ":7"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir / "out/latest.ckpt"));
  // Allowed to skip it, the run trains.
  object["skip_bad_lines"] = true;
  EXPECT_EQ(llm::run_pretraining(read_config(object), options), 0);
  EXPECT_EQ(llm::read_checkpoint(dir / "out/latest.ckpt").meta["step"], 2);

  // A token beyond the model's vocabulary is an error too, and so is "cuda" on a machine without a GPU.
  json small_vocab = tiny_config(dir / "out");
  small_vocab["model"]["vocab_size"] = 200;
  EXPECT_THROW(llm::run_pretraining(read_config(small_vocab), options), llm::ConfigError);
  if (llm::cuda::device_count() == 0) {
    json cuda = tiny_config(dir / "out");
    cuda["device"] = "cuda";
    EXPECT_THROW(llm::run_pretraining(read_config(cuda), options), llm::ConfigError);
  }
}

// A run shorter than its warmup never trains at its learning rate: the trainer says so, with the peak it
// does reach; a run whose warmup ends by its last step prints no such note.
TEST(Trainer, NotesAWarmupThatOutlastsTheRun) {
  TempDir dir;
  json object = tiny_config(dir / "out");
  object["max_steps"] = 3;
  object["warmup_steps"] = 100;
  object["val_fraction"] = 0.0;
  Pipeline s(object);
  RunOptions options;
  options.print = true;
  s.trainer = std::make_unique<llm::Trainer>(s.config, *s.backend, *s.train, nullptr, s.tokenizer);
  testing::internal::CaptureStdout();
  s.trainer->run(options);
  const std::string out = testing::internal::GetCapturedStdout();
  EXPECT_NE(out.find("note: warmup_steps 100 is longer than the run (max_steps 3): the learning rate rises "
                     "only to 9e-05 of 0.003"),
            std::string::npos)
      << out;

  object["warmup_steps"] = 3;  // reaches the learning rate at the last step
  object["output_dir"] = dir / "out2";
  Pipeline t(object);
  t.trainer = std::make_unique<llm::Trainer>(t.config, *t.backend, *t.train, nullptr, t.tokenizer);
  testing::internal::CaptureStdout();
  t.trainer->run(options);
  EXPECT_EQ(testing::internal::GetCapturedStdout().find("note: warmup_steps"), std::string::npos);
}

}  // namespace

namespace {

// save_total_limit keeps the newest numbered checkpoints (an earlier run's included); latest.ckpt and
// best.ckpt stay, and a limit without numbered checkpoints is refused.
TEST(Trainer, SaveTotalLimitKeepsTheNewestNumberedCheckpoints) {
  TempDir dir;
  const std::string out = dir / "out";
  json object = tiny_config(out);
  object["max_steps"] = 6;
  object["save_every"] = 1;
  object["eval_every"] = 2;
  object["save_best_only"] = false;
  object["save_total_limit"] = 2;
  // An earlier run's numbered checkpoint and a file of another name share the folder.
  std::filesystem::create_directories(out);
  std::ofstream(out + "/step_00000000.ckpt") << "earlier run";
  std::ofstream(out + "/step_notes.ckpt") << "not a numbered checkpoint";
  // A later step's file, left by a run that went further before this one started from an earlier step:
  // neither counted nor removed.
  std::ofstream(out + "/step_00000099.ckpt") << "a later step";
  Pipeline s(object);
  const RunResult r = s.run();
  ASSERT_FALSE(r.stopped_on_nonfinite);
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(out)) {
    const std::string name = entry.path().filename().string();
    if (name.size() > 5 && name.compare(name.size() - 5, 5, ".ckpt") == 0) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"best.ckpt", "latest.ckpt", "step_00000005.ckpt",
                                             "step_00000006.ckpt", "step_00000099.ckpt", "step_notes.ckpt"}));
  EXPECT_EQ(llm::read_checkpoint(out + "/step_00000005.ckpt").meta["step"], 5);

  // Without numbered checkpoints, a limit has nothing to limit.
  json best_only = tiny_config(dir / "out2");
  best_only["save_total_limit"] = 2;
  try {
    read_config(best_only);
    ADD_FAILURE() << "save_total_limit was accepted with save_best_only true";
  } catch (const llm::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("save_total_limit"), std::string::npos) << e.what();
  }
}

}  // namespace

namespace {

// The validation loss is the mean over all evaluated target tokens: with content-masked targets (very
// different counts per batch) it is the token-weighted mean of the batch means, not their plain mean.
TEST(Trainer, ValidationLossWeighsEveryTargetTokenAlike) {
  TempDir dir;
  json object = tiny_config(dir / "out");
  object["eval_steps"] = 3;
  Pipeline s(object);
  ASSERT_NE(s.val, nullptr);
  s.val = std::make_unique<MaskingSource>(std::move(s.val));
  llm::Trainer trainer(s.config, *s.backend, *s.train, s.val.get(), s.tokenizer);
  const double got = trainer.evaluate();

  s.val->reset();
  double weighted = 0.0, plain = 0.0;
  int64_t targets = 0;
  for (int i = 0; i < 3; ++i) {
    const llm::data::Batch b = s.val->next();
    TokenBatch view;
    view.B = b.B;
    view.T = b.T;
    view.inputs = b.inputs.data();
    view.targets = b.targets.data();
    const int64_t n = std::count_if(b.targets.begin(), b.targets.end(), [](int32_t t) { return t != -100; });
    const double loss = s.backend->evaluate(view);
    weighted += loss * static_cast<double>(n);
    plain += loss / 3.0;
    targets += n;
  }
  EXPECT_DOUBLE_EQ(got, weighted / static_cast<double>(targets));
  EXPECT_GT(std::fabs(got - plain), 1e-6) << "the batches' target counts should differ in this test";
}

}  // namespace

namespace {

// eval_steps given without eval_every, as a TRL recipe gives its evaluation period: a note says what it
// means here. With eval_every given too, no note.
TEST(Trainer, NotesWhatEvalStepsMeansWithoutEvalEvery) {
  TempDir dir;
  RunOptions options;
  options.print = true;
  const auto output_of = [&](const json& object) {
    Pipeline s(object);
    s.trainer = std::make_unique<llm::Trainer>(s.config, *s.backend, *s.train, s.val.get(), s.tokenizer);
    testing::internal::CaptureStdout();
    s.trainer->run(options);
    return testing::internal::GetCapturedStdout();
  };
  json object = tiny_config(dir / "out");
  object["max_steps"] = 2;
  object.erase("eval_every");
  const std::string out = output_of(object);
  EXPECT_NE(out.find("note: eval_steps 4 is the number of validation batches per evaluation; evaluations run "
                     "every eval_every 500 steps (TRL's eval_steps is that period)"),
            std::string::npos)
      << out;
  object["eval_every"] = 1;
  object["output_dir"] = dir / "out2";
  EXPECT_EQ(output_of(object).find("note: eval_steps"), std::string::npos);
}

}  // namespace
