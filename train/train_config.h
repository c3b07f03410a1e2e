// The pretraining config: LLM-Lab's base-training keys and defaults, plus the model (inline under
// "model" or from a file named by "model_config"), read strictly (unknown keys suggest the nearest).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llm/config.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace llm {

struct TrainConfig {
  ModelConfig model;
  std::string model_config_path;  // set when the model came from "model_config"

  // Data. Dataset specs are "path | subset | weight" (LLM-Lab's form); "builtin:arithmetic" is the
  // generated demo corpus.
  std::vector<std::string> datasets{"builtin:arithmetic"};
  std::vector<std::string> val_datasets;  // empty: hold out val_fraction of each training dataset
  double val_fraction = 0.05;
  bool skip_bad_lines = false;
  int prefetch = 2;

  // Optimisation (LLM-Lab defaults).
  int64_t max_steps = 10000;
  double lr = 3e-4;
  double weight_decay = 0.1;
  std::string scheduler = "cosine";
  int64_t warmup_steps = 1000;
  double min_lr_ratio = 0.0;
  double polynomial_power = 1.0;
  int batch_size = 1;
  int seq_len = 0;  // 0 means the model's max_seq_len
  int gradient_accumulation_steps = 64;
  double grad_clip = 1.0;  // 0 disables clipping
  OptimizerConfig optimizer;
  std::vector<std::string> no_decay_names, decay_names;  // override the role-based decay groups

  // Evaluation, logging, checkpoints.
  int eval_every = 500;
  int eval_steps = 100;
  int log_every = 10;
  int save_every = 500;
  bool save_best_only = true;
  int save_total_limit = 0;  // > 0: keep only the newest N numbered checkpoints (with save_best_only false)
  int early_stopping_patience = 0;        // > 0: stop after this many evaluations without a new best
  double early_stopping_threshold = 0.0;  // a new best must beat the old one by more than this
  std::string output_dir = "checkpoints";
  bool load_optimizer_state = true;  // on --resume

  // Samples printed during and after training.
  int sample_every = 0;  // 0: only at the end
  std::vector<std::string> sample_prompts;
  int sample_tokens = 48;
  double sample_temperature = 0.0;  // 0 is greedy
  int sample_top_k = 0;
  std::string sample_stop;  // stop a sample once it produces this text ("": at eos only)

  uint64_t seed = 42;
  std::string device = "auto";  // auto | cpu | cuda
  bool recompute = false;

  json source;  // the config object as read (after --set overrides), saved in checkpoints

  int resolved_seq_len() const { return seq_len > 0 ? seq_len : model.max_seq_len; }
  ScheduleConfig schedule() const;
  json to_json() const;
};

// Reads a training config. `overrides` are "key=value" strings applied first (--set). Relative paths
// in "model_config" are resolved against the config file's folder. Throws ConfigError.
TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides = {});
TrainConfig train_config_from_json(const json& object, const std::string& origin,
                                   const std::string& base_dir = ".");

// The JSON object of a config file with the --set overrides applied; base_dir receives the file's folder
// (relative paths in the config are resolved against it). Throws ConfigError naming the file.
json read_config_file(const std::string& path, const std::vector<std::string>& overrides,
                      std::string& base_dir);

// The keys every training loop shares (optimisation, schedule, evaluation, logging, checkpoints,
// samples, seed, device), read into `c` and checked; the SFT config (train/sft_config.h) uses them too.
void read_training_keys(KeyReader& r, TrainConfig& c);
// The model keys: "model" (inline) or "model_config" (a file; a relative path is taken from base_dir),
// read into c.model. given: one of them was there; valid: the model was read without a problem.
struct ModelKeys {
  bool given = false, valid = false;
};
ModelKeys read_model_keys(KeyReader& r, const json& object, const std::string& origin,
                          const std::string& base_dir, TrainConfig& c);
void check_training_keys(KeyReader& r, const TrainConfig& c);

}  // namespace llm
