// The training loop, written once for every backend and every objective that reduces to "mean loss
// of a batch of tokens": pretraining now; SFT reuses it with its own batch source.
//
// One step: zero the gradients; for each of the accumulation micro-batches, forward and backward with
// the gradient scaled by 1/accumulation; stop if the loss or the gradient norm is not finite; clip the
// global gradient norm; take the optimizer step at the scheduled learning rate. Around the steps it
// logs, evaluates, samples and writes checkpoints.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/loader.h"
#include "data/tokenizer.h"
#include "train/backend.h"
#include "train/checkpoint.h"
#include "train/train_config.h"

namespace llm {

struct RunOptions {
  std::string resume_path;         // a checkpoint to continue from ("" starts fresh)
  int64_t max_steps_override = 0;  // > 0: train to this step instead of config.max_steps
  bool load_optimizer_state = true;
  bool print = true;  // progress lines and samples on stdout
};

struct RunResult {
  int64_t start_step = 0, final_step = 0;
  std::vector<double> losses;  // train loss of every step taken in this run
  double last_val_loss = NAN, best_val_loss = NAN;
  bool stopped_on_nonfinite = false;
  bool early_stopped = false;   // early_stopping_patience evaluations passed without a new best
  std::string last_checkpoint;  // "" when none was written
};

class Trainer {
 public:
  // `val` may be null (no evaluation). The tokenizer is used for samples only.
  Trainer(const TrainConfig& config, TrainBackend& backend, data::BatchSource& train, data::BatchSource* val,
          const data::Tokenizer& tokenizer);
  RunResult run(const RunOptions& options);

  // The checkpoint of the current state (the loader state is that of the last consumed batch).
  Checkpoint make_checkpoint(int64_t step);
  // Loads parameters (and optimizer state when asked) and returns the step it was made at.
  int64_t restore_checkpoint(const std::string& path, bool load_optimizer_state);

  double evaluate();
  // Called after each checkpoint file is written ("best.ckpt", "latest.ckpt", "step_N.ckpt"), e.g. to
  // write LoRA adapters beside it.
  std::function<void(const std::string& file, int64_t step)> after_save;
  // Identifies the frozen base weights (LoRA, QLoRA), e.g. {"source", "fingerprint", "nf4",
  // "double_quant"}. When set and the layout has frozen tensors, checkpoints hold the trainable tensors
  // only, with this value in their header, and resuming one needs an equal value (all but "source", which
  // only names where the base came from). Null: checkpoints hold every tensor.
  json frozen_base;
  std::string generate(const std::string& prompt, int max_tokens, uint64_t sample_counter);

 private:
  // Whether checkpoints leave the frozen base out (frozen_base set, and some tensor frozen).
  bool adapters_only_checkpoints() const;
  // Writes a checkpoint; false (and nothing written) when it would hold a non-finite value.
  bool save(const std::string& file, int64_t step, RunResult& result);
  void log_metrics(const json& entry);
  void remove_old_numbered_checkpoints(int64_t step);
  void drop_metrics_after(int64_t step);

  const TrainConfig& config_;
  TrainBackend& backend_;
  data::BatchSource& train_;
  data::BatchSource* val_;
  const data::Tokenizer& tokenizer_;
  json data_state_;  // state_after of the last consumed training batch
  double best_val_loss_ = NAN;
  int64_t tokens_seen_ = 0;
  // Global step minus the optimizer's own step count (non-zero after resuming without optimizer state).
  int64_t optimizer_step_offset_ = 0;
  int evals_without_improvement_ = 0;
};

// A 64-bit fingerprint, as 16 hex digits, of the values of the frozen tensors of `layout` (layout order),
// read from `params` at the layout offsets; `count` (the size of params) must cover them. FNV-1a's
// multiply over the values' bits, eight bytes at a time, each step folded with a shift so that every bit
// reaches every other: not cryptographic, it tells bases apart.
std::string frozen_tensors_fingerprint(const ParameterLayout& layout, const float* params, size_t count);
// The same fingerprint fed one frozen tensor at a time, in layout order (a base streamed from disk).
class FrozenFingerprint {
 public:
  void add(const float* values, size_t n);
  std::string hex() const;

 private:
  uint64_t hash_ = 14695981039346656037ull;  // FNV-1a 64 offset basis
};

// Builds the tokenizer, datasets, loaders and backend from a config and runs it: what
// ./train_pretrain does. Returns the process exit code.
int run_pretraining(const TrainConfig& config, const RunOptions& options);

}  // namespace llm
