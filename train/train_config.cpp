#include "train/train_config.h"

namespace llm {

ScheduleConfig TrainConfig::schedule() const {
  ScheduleConfig s;
  s.scheduler = scheduler;
  s.lr = lr;
  s.warmup_steps = warmup_steps;
  s.total_steps = max_steps;
  s.min_lr_ratio = min_lr_ratio;
  s.polynomial_power = polynomial_power;
  return s;
}

void read_training_keys(KeyReader& r, TrainConfig& c) {
  r.get("max_steps", c.max_steps);
  r.get("lr", c.lr);
  r.get("weight_decay", c.weight_decay);
  r.get_choice("scheduler", c.scheduler, {"none", "cosine", "linear", "polynomial"});
  r.get("warmup_steps", c.warmup_steps);
  r.get("min_lr_ratio", c.min_lr_ratio);
  r.get("polynomial_power", c.polynomial_power);
  r.get("batch_size", c.batch_size);
  r.get("gradient_accumulation_steps", c.gradient_accumulation_steps);
  r.get("grad_clip", c.grad_clip);
  read_optimizer_config(r, c.optimizer);
  r.get("no_decay_names", c.no_decay_names);
  r.get("decay_names", c.decay_names);
  r.get("eval_every", c.eval_every);
  r.get("eval_steps", c.eval_steps);
  r.get("log_every", c.log_every);
  r.get("save_every", c.save_every);
  r.get("save_best_only", c.save_best_only);
  r.get("save_total_limit", c.save_total_limit);
  r.get("early_stopping_patience", c.early_stopping_patience);
  r.get("early_stopping_threshold", c.early_stopping_threshold);
  r.get("output_dir", c.output_dir);
  r.get("load_optimizer_state", c.load_optimizer_state);
  r.get("sample_every", c.sample_every);
  r.get("sample_prompts", c.sample_prompts);
  r.get("sample_tokens", c.sample_tokens);
  r.get("sample_temperature", c.sample_temperature);
  r.get("sample_top_k", c.sample_top_k);
  r.get("sample_stop", c.sample_stop);
  int64_t seed = static_cast<int64_t>(c.seed);
  if (r.get("seed", seed)) {
    if (seed < 0) r.problem("seed", "must not be negative");
    c.seed = static_cast<uint64_t>(seed);
  }
  r.get_choice("device", c.device, {"auto", "cpu", "cuda"});
  r.get("recompute", c.recompute);
}

void check_training_keys(KeyReader& r, const TrainConfig& c) {
  auto at_least = [&r](const char* key, int64_t value, int64_t minimum) {
    if (value < minimum) {
      r.problem(key, "must be at least " + std::to_string(minimum) + ", found " + std::to_string(value));
    }
  };
  at_least("max_steps", c.max_steps, 1);
  at_least("batch_size", c.batch_size, 1);
  at_least("gradient_accumulation_steps", c.gradient_accumulation_steps, 1);
  at_least("warmup_steps", c.warmup_steps, 0);
  at_least("eval_every", c.eval_every, 0);
  at_least("eval_steps", c.eval_steps, 1);
  at_least("log_every", c.log_every, 1);
  at_least("save_every", c.save_every, 0);
  at_least("save_total_limit", c.save_total_limit, 0);
  if (c.save_total_limit > 0 && c.save_best_only)
    r.problem("save_total_limit",
              "limits the numbered checkpoints, which only \"save_best_only\": false writes");
  at_least("prefetch", c.prefetch, 1);
  at_least("sample_every", c.sample_every, 0);
  at_least("sample_tokens", c.sample_tokens, 0);
  at_least("early_stopping_patience", c.early_stopping_patience, 0);
  if (c.early_stopping_threshold < 0.0) r.problem("early_stopping_threshold", "must not be negative");
  if (!(c.lr > 0.0)) r.problem("lr", "must be positive");
  if (c.weight_decay < 0.0) r.problem("weight_decay", "must not be negative");
  if (c.grad_clip < 0.0) r.problem("grad_clip", "must not be negative (0 disables clipping)");
  if (!(c.min_lr_ratio >= 0.0 && c.min_lr_ratio <= 1.0)) r.problem("min_lr_ratio", "must be in [0, 1]");
  if (!(c.polynomial_power > 0.0)) r.problem("polynomial_power", "must be positive");
  if (c.sample_temperature < 0.0) r.problem("sample_temperature", "must not be negative (0 is greedy)");
  for (const auto& message : validate_optimizer_config(c.optimizer)) r.problems_add(message);
}

ModelKeys read_model_keys(KeyReader& r, const json& object, const std::string& origin,
                          const std::string& base_dir, TrainConfig& c) {
  ModelKeys keys;
  r.allow("model");
  r.get("model_config", c.model_config_path);
  const bool inline_model = object.is_object() && object.contains("model");
  keys.given = inline_model || !c.model_config_path.empty();
  if (inline_model) {
    if (!c.model_config_path.empty())
      r.problem("model", "give either \"model\" or \"model_config\", not both");
    try {
      c.model = model_config_from_json(object["model"], origin + ": model");
      keys.valid = true;
    } catch (const ConfigError& e) {
      r.problems_add(std::string("in \"model\":\n") + e.what());
    }
  } else if (!c.model_config_path.empty()) {
    std::string path = c.model_config_path;
    if (path[0] != '/') path = base_dir + "/" + path;
    try {
      c.model = load_model_config(path);
      keys.valid = true;
    } catch (const ConfigError& e) {
      r.problems_add(e.what());
    }
  }
  return keys;
}

TrainConfig train_config_from_json(const json& object, const std::string& origin,
                                   const std::string& base_dir) {
  TrainConfig c;
  c.source = object;
  KeyReader r(object, origin);
  const ModelKeys model = read_model_keys(r, object, origin, base_dir, c);
  const bool have_model = model.valid;
  if (!model.given) {
    r.problem("model",
              "missing: give the architecture inline as \"model\": {...} or as \"model_config\": \"path\"");
  }

  r.get("datasets", c.datasets);
  r.get("val_datasets", c.val_datasets);
  r.get("val_fraction", c.val_fraction);
  r.get("skip_bad_lines", c.skip_bad_lines);
  r.get("prefetch", c.prefetch);
  r.get("seq_len", c.seq_len);
  read_training_keys(r, c);

  if (r.problems().empty()) {
    check_training_keys(r, c);
    if (!(c.val_fraction >= 0.0 && c.val_fraction < 1.0)) r.problem("val_fraction", "must be in [0, 1)");
    if (c.datasets.empty()) r.problem("datasets", "must name at least one dataset");
    if (c.seq_len < 0) r.problem("seq_len", "must be at least 0, found " + std::to_string(c.seq_len));
    if (have_model && c.seq_len > c.model.max_seq_len) {
      r.problem("seq_len", "(" + std::to_string(c.seq_len) + ") exceeds the model's max_seq_len (" +
                               std::to_string(c.model.max_seq_len) + ")");
    }
  }
  r.finish();
  return c;
}

json read_config_file(const std::string& path, const std::vector<std::string>& overrides,
                      std::string& base_dir) {
  json object = parse_json_file(path);
  for (const auto& assignment : overrides) {
    if (!object.is_object()) break;  // reported by the reader
    apply_override(object, assignment);
  }
  const size_t slash = path.find_last_of('/');
  base_dir = slash == std::string::npos ? "." : path.substr(0, slash);
  return object;
}

TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::string base_dir;
  const json object = read_config_file(path, overrides, base_dir);
  return train_config_from_json(object, path, base_dir);
}

json TrainConfig::to_json() const {
  json j;
  j["model"] = model.to_json();
  j["datasets"] = datasets;
  j["val_datasets"] = val_datasets;
  j["val_fraction"] = val_fraction;
  j["skip_bad_lines"] = skip_bad_lines;
  j["prefetch"] = prefetch;
  j["max_steps"] = max_steps;
  j["lr"] = lr;
  j["weight_decay"] = weight_decay;
  j["scheduler"] = scheduler;
  j["warmup_steps"] = warmup_steps;
  j["min_lr_ratio"] = min_lr_ratio;
  j["polynomial_power"] = polynomial_power;
  j["batch_size"] = batch_size;
  j["seq_len"] = seq_len;
  j["gradient_accumulation_steps"] = gradient_accumulation_steps;
  j["grad_clip"] = grad_clip;
  j["optimizer"] = optimizer.name;
  j["no_decay_names"] = no_decay_names;
  j["decay_names"] = decay_names;
  j["eval_every"] = eval_every;
  j["eval_steps"] = eval_steps;
  j["log_every"] = log_every;
  j["save_every"] = save_every;
  j["save_best_only"] = save_best_only;
  j["save_total_limit"] = save_total_limit;
  j["early_stopping_patience"] = early_stopping_patience;
  j["early_stopping_threshold"] = early_stopping_threshold;
  j["output_dir"] = output_dir;
  j["sample_every"] = sample_every;
  j["sample_prompts"] = sample_prompts;
  j["sample_tokens"] = sample_tokens;
  j["sample_temperature"] = sample_temperature;
  j["sample_top_k"] = sample_top_k;
  j["sample_stop"] = sample_stop;
  j["seed"] = seed;
  j["device"] = device;
  j["recompute"] = recompute;
  return j;
}

}  // namespace llm
