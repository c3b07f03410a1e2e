#include "train/trainer.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>

#include "data/atomic_file.h"
#include "data/tokenizer_factory.h"
#include "llm/sampling.h"
#include "train/cpu_backend.h"
#include "train/cuda_backend.h"

namespace llm {

namespace {

// Target tokens of a batch: those that carry loss (not the ignore index -100), as the model counts them.
int64_t count_targets(const data::Batch& batch) {
  return std::count_if(batch.targets.begin(), batch.targets.end(), [](int32_t t) { return t != -100; });
}

TokenBatch view_of(const data::Batch& b) {
  TokenBatch t;
  t.B = b.B;
  t.T = b.T;
  t.inputs = b.inputs.data();
  t.targets = b.targets.data();
  t.positions = b.positions.empty() ? nullptr : b.positions.data();
  t.doc_ids = b.doc_ids.empty() ? nullptr : b.doc_ids.data();
  return t;
}

std::string format_duration(double seconds) {
  const long s = static_cast<long>(seconds + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  return buf;
}

void make_dirs(const std::string& path) {
  std::string partial;
  for (size_t i = 0; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      if (!partial.empty()) ::mkdir(partial.c_str(), 0755);
    }
    if (i < path.size()) partial.push_back(path[i]);
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    throw std::runtime_error("cannot create output_dir " + path);
  }
}

}  // namespace

Trainer::Trainer(const TrainConfig& config, TrainBackend& backend, data::BatchSource& train,
                 data::BatchSource* val, const data::Tokenizer& tokenizer)
    : config_(config), backend_(backend), train_(train), val_(val), tokenizer_(tokenizer) {
  data_state_ = train_.state();
}

double Trainer::evaluate() {
  if (!val_) return NAN;
  val_->reset();
  // The mean over all the evaluated target tokens (each batch's mean weighted by its targets), as the
  // training loss is: batches with few targets (short completions) do not count for more.
  double weighted_sum = 0.0;
  int64_t targets = 0;
  for (int i = 0; i < config_.eval_steps; ++i) {
    const data::Batch batch = val_->next();
    const int64_t batch_targets = count_targets(batch);
    if (batch_targets == 0) continue;
    weighted_sum += backend_.evaluate(view_of(batch)) * static_cast<double>(batch_targets);
    targets += batch_targets;
  }
  return targets > 0 ? weighted_sum / static_cast<double>(targets) : NAN;
}

std::string Trainer::generate(const std::string& prompt, int max_tokens, uint64_t sample_counter) {
  std::vector<int32_t> tokens = tokenizer_.encode(prompt);
  if (tokens.empty() && tokenizer_.bos_id() >= 0) tokens.push_back(tokenizer_.bos_id());
  if (tokens.empty()) return "";
  std::vector<int32_t> generated;
  for (int i = 0; i < max_tokens; ++i) {
    const std::vector<float> logits = backend_.next_token_logits(tokens);
    const int next = sample_token(logits, config_.sample_temperature, config_.sample_top_k, config_.seed,
                                  sample_counter * 1000003ull + static_cast<uint64_t>(i));
    if (next == tokenizer_.eos_id()) break;
    tokens.push_back(next);
    generated.push_back(next);
    if (!config_.sample_stop.empty()) {
      const std::string text = tokenizer_.decode(generated);
      const size_t stop = text.find(config_.sample_stop);
      if (stop != std::string::npos) return text.substr(0, stop);
    }
  }
  return tokenizer_.decode(generated);
}

Checkpoint Trainer::make_checkpoint(int64_t step) {
  Checkpoint ck;
  ck.meta["format"] = "llm checkpoint v1";
  ck.meta["step"] = step;
  ck.meta["config"] = config_.source;
  ck.meta["model"] = config_.model.to_json();
  ck.meta["optimizer"] = backend_.optimizer_name();
  ck.meta["data_state"] = data_state_;
  ck.meta["best_val_loss"] = std::isnan(best_val_loss_) ? json(nullptr) : json(best_val_loss_);
  ck.meta["tokens_seen"] = tokens_seen_;
  ck.meta["optimizer_step_offset"] = optimizer_step_offset_;
  ck.meta["evals_without_improvement"] = evals_without_improvement_;
  if (adapters_only_checkpoints()) {
    // The frozen base is not saved: a resumed run loads it again from its source, and the header's
    // frozen_base checks that it is the same.
    ck.meta["frozen_base"] = frozen_base;
    const std::vector<float> params = backend_.read_trainable_parameters();
    for (const auto& t : backend_.layout().tensors()) {
      if (!t.trainable) continue;
      ck.arrays.push_back(
          {t.name, "param", t.shape,
           std::vector<float>(params.begin() + t.grad_offset, params.begin() + t.grad_offset + t.numel)});
    }
  } else {
    const std::vector<float> params = backend_.read_parameters();
    for (const auto& t : backend_.layout().tensors()) {
      ck.arrays.push_back(
          {t.name, "param", t.shape,
           std::vector<float>(params.begin() + t.offset, params.begin() + t.offset + t.numel)});
    }
  }
  for (auto& s : backend_.optimizer_state()) ck.arrays.push_back({s.name, "optimizer", {}, s.data});
  return ck;
}

int64_t Trainer::restore_checkpoint(const std::string& path, bool load_optimizer_state) {
  const Checkpoint ck = read_checkpoint(path, load_optimizer_state);
  auto fail = [&path](const std::string& why) {
    return CheckpointError("cannot resume from " + path + ": " + why);
  };
  // Everything is checked before anything is changed, so a refused checkpoint leaves the run as it was.
  if (!ck.meta.contains("model") || ck.meta["model"] != config_.model.to_json()) {
    json saved = ck.meta.contains("model") ? ck.meta["model"] : json(), current = config_.model.to_json();
    if (saved.is_object() && saved.contains("tokenizer_name")) {
      const json saved_tokenizer = saved["tokenizer_name"], current_tokenizer = current["tokenizer_name"];
      saved.erase("tokenizer_name");
      current.erase("tokenizer_name");
      if (saved == current) {  // e.g. a Hugging Face base folder that moved: its path names the tokenizer
        throw fail("it was made with the tokenizer " + saved_tokenizer.dump() + ", and this config's is " +
                   current_tokenizer.dump() + " (give base_model the path the run was started with)");
      }
    }
    throw fail("it was made for a different model architecture than this config describes");
  }
  const json& meta = ck.meta;
  if (!meta.contains("step") || !meta["step"].is_number_integer() || meta["step"].get<int64_t>() < 0 ||
      !meta.contains("data_state")) {
    throw fail("its header lacks the step or the data loader state");
  }
  const int64_t step = meta["step"].get<int64_t>();
  // A checkpoint with a frozen_base holds the trainable tensors only; the base must be the one this run
  // loaded.
  const bool adapters_only = meta.contains("frozen_base");
  if (adapters_only) {
    const json& saved = meta["frozen_base"];
    const auto source = [](const json& base) {
      return base.is_object() && base.contains("source") && base["source"].is_string()
                 ? base["source"].get<std::string>()
                 : std::string("an unnamed base");
    };
    if (frozen_base.is_null()) {
      throw fail("it holds only the trainable tensors of a model whose frozen base is " + source(saved) +
                 ", and this run has no frozen base");
    }
    json saved_id = saved, current_id = frozen_base;
    if (saved_id.is_object()) saved_id.erase("source");
    if (current_id.is_object()) current_id.erase("source");
    if (saved_id != current_id) {
      throw fail("it was trained on another frozen base (" + source(saved) + ": " + saved_id.dump() +
                 "; this run: " + source(frozen_base) + ": " + current_id.dump() +
                 "): a different base_model (or, without one, another seed), or other quantisation settings");
    }
  }
  const size_t stored =
      adapters_only ? backend_.layout().trainable_elements() : backend_.layout().total_elements();
  std::vector<float> params(stored);
  std::set<std::string> loaded;
  size_t expected_tensors = 0;
  for (const auto& t : backend_.layout().tensors()) expected_tensors += !adapters_only || t.trainable;
  std::vector<StateBuffer> optimizer_state;
  for (const auto& a : ck.arrays) {
    if (a.kind == "optimizer") {
      optimizer_state.push_back({a.name, a.data});
      continue;
    }
    if (!backend_.layout().contains(a.name)) throw fail("unexpected tensor " + a.name);
    const TensorInfo& t = backend_.layout().at(a.name);
    if (adapters_only && !t.trainable) throw fail("tensor " + a.name + " is frozen and should not be in it");
    if (a.shape != t.shape || static_cast<int64_t>(a.data.size()) != t.numel) {
      throw fail("tensor " + a.name + " has the wrong shape");
    }
    if (!loaded.insert(a.name).second) throw fail("tensor " + a.name + " appears twice");
    std::copy(a.data.begin(), a.data.end(), params.begin() + (adapters_only ? t.grad_offset : t.offset));
  }
  if (loaded.size() != expected_tensors) {
    for (const auto& t : backend_.layout().tensors()) {
      if ((!adapters_only || t.trainable) && loaded.count(t.name) == 0)
        throw fail("tensor " + t.name + " is missing");
    }
  }
  // A checkpoint with every tensor, in a run with a frozen base: its frozen tensors must be the base this
  // run loaded (whose fingerprint later checkpoints will carry), and only the trainable ones are taken.
  const bool keep_frozen = !adapters_only && adapters_only_checkpoints();
  if (keep_frozen) {
    const std::vector<float> current = backend_.read_parameters();
    for (const auto& t : backend_.layout().tensors()) {
      if (t.trainable) continue;
      const auto first = params.begin() + static_cast<std::ptrdiff_t>(t.offset);
      if (!std::equal(first, first + t.numel, current.begin() + static_cast<std::ptrdiff_t>(t.offset))) {
        throw fail("its frozen tensor " + t.name + " differs from this run's base (" +
                   (frozen_base.contains("source") ? frozen_base["source"].dump() : std::string("?")) +
                   "): it was trained on another base");
      }
    }
  }
  // Fresh optimizer state counts its own steps from 1 (AdamW's bias correction assumes it).
  int64_t optimizer_step_offset = step;
  if (load_optimizer_state) {
    const json& offset = meta.contains("optimizer_step_offset") ? meta["optimizer_step_offset"] : json(0);
    if (!offset.is_number_integer() || offset.get<int64_t>() < 0 || offset.get<int64_t>() > step) {
      throw fail("its header has a bad optimizer_step_offset");
    }
    optimizer_step_offset = offset.get<int64_t>();
    const std::string saved = meta.contains("optimizer") && meta["optimizer"].is_string()
                                  ? meta["optimizer"].get<std::string>()
                                  : "";
    if (saved != backend_.optimizer_name()) {
      throw fail(
          "it holds " + saved + " optimizer state but the config uses " + backend_.optimizer_name() +
          "; resume without the optimizer state (--no-optimizer-state, or \"load_optimizer_state\": false)");
    }
  }
  try {
    train_.restore(meta["data_state"]);  // leaves the loader unchanged when it throws
  } catch (const std::exception& e) {
    throw fail(std::string("the data loader state does not fit this config's datasets: ") + e.what());
  }
  if (load_optimizer_state) {
    try {
      backend_.load_optimizer_state(optimizer_state);
    } catch (const std::exception& e) {
      throw fail(e.what());
    }
  }
  optimizer_step_offset_ = optimizer_step_offset;
  if (adapters_only) {
    backend_.write_trainable_parameters(params);
  } else if (keep_frozen) {
    backend_.write_trainable_parameters(gather_trainable(backend_.layout(), params.data()));
  } else {
    backend_.write_parameters(params);
  }
  data_state_ = meta["data_state"];
  best_val_loss_ = meta.contains("best_val_loss") && meta["best_val_loss"].is_number()
                       ? meta["best_val_loss"].get<double>()
                       : NAN;
  tokens_seen_ = meta.contains("tokens_seen") && meta["tokens_seen"].is_number_integer()
                     ? meta["tokens_seen"].get<int64_t>()
                     : 0;
  evals_without_improvement_ =
      meta.contains("evals_without_improvement") && meta["evals_without_improvement"].is_number_integer()
          ? meta["evals_without_improvement"].get<int>()
          : 0;
  return step;
}

bool Trainer::adapters_only_checkpoints() const {
  if (frozen_base.is_null()) return false;
  for (const auto& t : backend_.layout().tensors())
    if (!t.trainable) return true;
  return false;
}

void FrozenFingerprint::add(const float* values, size_t n) {
  for (size_t i = 0; i < n; i += 2) {
    uint32_t bits[2] = {0, 0};
    std::memcpy(bits, values + i, (i + 1 < n ? 2 : 1) * sizeof(float));
    hash_ = (hash_ ^ (static_cast<uint64_t>(bits[1]) << 32 | bits[0])) * 1099511628211ull;  // FNV prime
    hash_ ^= hash_ >> 32;  // a product carries low bits up only; this carries the high ones down
  }
}

std::string FrozenFingerprint::hex() const {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(hash_));
  return text;
}

std::string frozen_tensors_fingerprint(const ParameterLayout& layout, const float* params, size_t count) {
  FrozenFingerprint fingerprint;
  for (const auto& t : layout.tensors()) {
    if (t.trainable) continue;
    const size_t n = static_cast<size_t>(t.numel);
    if (t.offset + n > count) {
      throw std::invalid_argument("frozen_tensors_fingerprint: " + t.name + " lies beyond the " +
                                  std::to_string(count) + " values given");
    }
    fingerprint.add(params + t.offset, n);
  }
  return fingerprint.hex();
}

bool Trainer::save(const std::string& file, int64_t step, RunResult& result) {
  const std::string path = config_.output_dir + "/" + file;
  const Checkpoint ck = make_checkpoint(step);
  // An update can overflow the weights even when the loss and the gradients were finite; such weights
  // must not replace the last good checkpoint. (Optimizer state is not checked: 8-bit AdamW keeps
  // quantised codes in its float buffers, whose bit patterns may read as NaN.)
  for (const auto& a : ck.arrays) {
    if (a.kind != "param") continue;
    for (float v : a.data) {
      if (!std::isfinite(v)) {
        std::fprintf(
            stderr,
            "error: step %lld: parameter %s holds a value that is not finite after the update; stopping "
            "without writing %s. The last good checkpoint is %s. Lower lr, or check the data.\n",
            (long long)step, a.name.c_str(), path.c_str(),
            result.last_checkpoint.empty() ? "(none written in this run)" : result.last_checkpoint.c_str());
        return false;
      }
    }
  }
  write_checkpoint(path, ck);
  result.last_checkpoint = path;
  if (after_save) after_save(file, step);
  return true;
}

// Keeps the newest save_total_limit step_*.ckpt files of output_dir up to `step` (an earlier run's
// included, as transformers' Trainer does); latest.ckpt and best.ckpt are never removed, nor are files of
// later steps (left by a run that went further before this one resumed from an earlier checkpoint), so
// that the limit never removes this run's own newest checkpoints in their favour.
void Trainer::remove_old_numbered_checkpoints(int64_t step) {
  namespace fs = std::filesystem;
  std::vector<std::string> numbered;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(config_.output_dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.size() != 18 || name.compare(0, 5, "step_") != 0 || name.compare(13, 5, ".ckpt") != 0 ||
        !std::all_of(name.begin() + 5, name.begin() + 13, [](char ch) { return ch >= '0' && ch <= '9'; }))
      continue;
    if (std::stoll(name.substr(5, 8)) <= step) numbered.push_back(name);
  }
  std::sort(numbered.begin(), numbered.end());  // zero-padded steps: name order is step order
  for (size_t i = 0; i + static_cast<size_t>(config_.save_total_limit) < numbered.size(); ++i) {
    fs::remove(config_.output_dir + "/" + numbered[i], ec);
    if (ec) {
      std::fprintf(stderr, "warning: cannot remove old checkpoint %s/%s: %s\n", config_.output_dir.c_str(),
                   numbered[i].c_str(), ec.message().c_str());
    }
  }
}

void Trainer::log_metrics(const json& entry) {
  std::ofstream out(config_.output_dir + "/metrics.jsonl", std::ios::app);
  out << entry.dump() << "\n";
}

void Trainer::drop_metrics_after(int64_t step) {
  // Lines a stopped run logged after its last checkpoint (and a line torn by a crash) describe steps
  // the resumed run takes again: drop them, so each step appears once.
  const std::string path = config_.output_dir + "/metrics.jsonl";
  std::ifstream in(path);
  if (!in) return;
  std::string kept, line;
  bool dropped = false;
  while (std::getline(in, line)) {
    const json entry = json::parse(line, nullptr, false);
    if (entry.is_object() && entry.contains("step") && entry["step"].is_number_integer() &&
        entry["step"].get<int64_t>() <= step) {
      kept += line + "\n";
    } else {
      dropped = true;
    }
  }
  in.close();
  if (dropped) write_file_atomic<std::runtime_error>(path, kept);
}

RunResult Trainer::run(const RunOptions& options) {
  RunResult result;
  make_dirs(config_.output_dir);
  int64_t step = 0;
  if (!options.resume_path.empty()) {
    step = restore_checkpoint(options.resume_path, options.load_optimizer_state);
    drop_metrics_after(step);
    if (options.print)
      std::printf("resumed from %s at step %lld\n", options.resume_path.c_str(), (long long)step);
  } else {
    std::ofstream(config_.output_dir + "/metrics.jsonl", std::ios::trunc);
  }
  result.start_step = step;
  const int64_t max_steps = options.max_steps_override > 0 ? options.max_steps_override : config_.max_steps;
  ScheduleConfig schedule = config_.schedule();
  schedule.total_steps = max_steps;
  if (options.print && step < max_steps && schedule.warmup_steps > max_steps && schedule.lr > 0.0) {
    // A short run with the default warmup (e.g. 100 steps of warmup in a 20-step run) never trains at its
    // learning rate, which is rarely what was meant.
    std::printf(
        "note: warmup_steps %lld is longer than the run (max_steps %lld): the learning rate rises only to "
        "%.3g of %.3g (set warmup_steps or warmup_ratio lower)\n",
        (long long)schedule.warmup_steps, (long long)max_steps, learning_rate_at(schedule, max_steps),
        schedule.lr);
  }
  const json& source = config_.source;
  if (options.print && val_ && source.is_object() && source.contains("eval_steps") &&
      !source.contains("eval_every")) {
    // TRL's eval_steps is the evaluation period; ours (LLM-Lab's) is the number of validation batches.
    std::printf(
        "note: eval_steps %d is the number of validation batches per evaluation; evaluations run every "
        "eval_every %d steps (TRL's eval_steps is that period)\n",
        config_.eval_steps, config_.eval_every);
  }
  const int accumulation = config_.gradient_accumulation_steps;
  const auto start_time = std::chrono::steady_clock::now();
  auto elapsed = [&start_time]() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
  };
  int64_t window_tokens = 0;
  double window_start = 0.0, window_flops = 0.0;
  const double peak_flops = backend_.peak_flops();

  while (step < max_steps) {
    const int64_t next_step = step + 1;
    backend_.zero_grad();
    double loss = 0.0;
    int64_t step_tokens = 0;
    // The step's loss is the mean over all its target tokens, not the mean of the micro-batches' means
    // (which gives each token of a micro-batch with few targets more weight; transformers fixed the same
    // in 4.46). So each micro-batch's mean counts by its share of the step's targets, and any split of
    // the same rows into micro-batches gives the same gradient.
    std::vector<data::Batch> micro_batches(static_cast<size_t>(accumulation));
    std::vector<int64_t> micro_targets(static_cast<size_t>(accumulation));
    int64_t step_targets = 0;
    for (int micro = 0; micro < accumulation; ++micro) {
      micro_batches[micro] = train_.next();
      micro_targets[micro] = count_targets(micro_batches[micro]);
      step_targets += micro_targets[micro];
    }
    for (int micro = 0; micro < accumulation; ++micro) {
      const data::Batch& batch = micro_batches[micro];
      const uint64_t counter = static_cast<uint64_t>(step) * accumulation + micro;
      const double weight =
          step_targets > 0 ? static_cast<double>(micro_targets[micro]) / static_cast<double>(step_targets)
                           : 0.0;
      // A micro-batch without targets adds nothing (its weight is 0): no need to run it.
      if (micro_targets[micro] > 0)
        loss += backend_.forward_backward(view_of(batch), weight, counter) * weight;
      step_tokens += batch.num_tokens;
      window_flops +=
          static_cast<double>(batch.num_tokens) * training_flops_per_token(config_.model, batch.T);
      data_state_ = batch.state_after;
    }
    const data::Batch& batch = micro_batches.back();
    double norm = backend_.grad_norm();
    if (!std::isfinite(loss) || !std::isfinite(norm)) {
      std::fprintf(
          stderr,
          "error: step %lld: the %s is not finite (loss %g, grad norm %g); stopping without an update. "
          "The last good checkpoint is %s. Lower lr, or check the data.\n",
          (long long)next_step, std::isfinite(loss) ? "gradient norm" : "loss", loss, norm,
          result.last_checkpoint.empty() ? "(none written in this run)" : result.last_checkpoint.c_str());
      result.stopped_on_nonfinite = true;
      break;
    }
    if (config_.grad_clip > 0.0 && norm > config_.grad_clip) backend_.scale_grads(config_.grad_clip / norm);
    const double lr = learning_rate_at(schedule, next_step);
    // The optimizer's own step count: it starts at 1 again when the run resumed without its state.
    const int64_t optimizer_step = next_step - optimizer_step_offset_;
    backend_.optimizer_step(lr, optimizer_step);
    if (backend_.wants_hessian_estimate(optimizer_step)) {
      // Sophia: the estimate uses the step's last micro-batch, so no extra data is consumed.
      backend_.update_hessian_estimate(view_of(batch), static_cast<int>(step_tokens),
                                       static_cast<uint64_t>(next_step));
    }
    step = next_step;
    tokens_seen_ += step_tokens;
    window_tokens += step_tokens;
    result.losses.push_back(loss);

    if (step % config_.log_every == 0 || step == max_steps) {
      const double now = elapsed();
      const double tokens_per_s = window_tokens / std::max(1e-9, now - window_start);
      const double flops_per_s = window_flops / std::max(1e-9, now - window_start);
      char mfu[32] = "";
      if (peak_flops > 0.0)
        std::snprintf(mfu, sizeof(mfu), " | MFU %.1f%%", 100.0 * flops_per_s / peak_flops);
      const double eta =
          (now / static_cast<double>(step - result.start_step)) * static_cast<double>(max_steps - step);
      if (options.print) {
        std::printf(
            "step %6lld/%lld | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s%s | %s elapsed | ETA %s\n",
            (long long)step, (long long)max_steps, loss, lr, norm, tokens_per_s, mfu,
            format_duration(now).c_str(), format_duration(eta).c_str());
        std::fflush(stdout);
      }
      log_metrics({{"step", step},
                   {"loss", loss},
                   {"lr", lr},
                   {"grad_norm", norm},
                   {"tokens_per_s", tokens_per_s},
                   {"model_flops_per_s", flops_per_s},
                   {"tokens_seen", tokens_seen_},
                   {"elapsed_s", now}});
      window_tokens = 0;
      window_flops = 0.0;
      window_start = now;
    }
    const bool last = step == max_steps;
    if (val_ && ((config_.eval_every > 0 && step % config_.eval_every == 0) || last)) {
      const double val_loss = evaluate();
      result.last_val_loss = val_loss;
      const bool improved =
          std::isfinite(val_loss) &&
          (std::isnan(best_val_loss_) || val_loss < best_val_loss_ - config_.early_stopping_threshold);
      if (improved) best_val_loss_ = val_loss;
      evals_without_improvement_ = improved ? 0 : evals_without_improvement_ + 1;
      if (options.print) {
        std::printf("step %6lld/%lld | val loss %.4f%s\n", (long long)step, (long long)max_steps, val_loss,
                    improved ? " (best)" : "");
      }
      log_metrics({{"step", step}, {"val_loss", val_loss}});
      if (improved && !save("best.ckpt", step, result)) {
        result.stopped_on_nonfinite = true;
        break;
      }
      if (config_.early_stopping_patience > 0 &&
          evals_without_improvement_ >= config_.early_stopping_patience) {
        if (options.print) {
          std::printf(
              "step %6lld/%lld | early stopping: %d evaluations without a new best (best val loss %.4f)\n",
              (long long)step, (long long)max_steps, evals_without_improvement_, best_val_loss_);
        }
        result.early_stopped = true;
        if (!save("latest.ckpt", step, result)) result.stopped_on_nonfinite = true;
        break;
      }
    }
    if ((config_.save_every > 0 && step % config_.save_every == 0) || last) {
      if (!save("latest.ckpt", step, result)) {
        result.stopped_on_nonfinite = true;
        break;
      }
      if (!config_.save_best_only) {
        char name[64];
        std::snprintf(name, sizeof(name), "step_%08lld.ckpt", (long long)step);
        if (save(name, step, result) && config_.save_total_limit > 0) remove_old_numbered_checkpoints(step);
      }
    }
    if (options.print && config_.sample_every > 0 && step % config_.sample_every == 0 && !last) {
      for (size_t i = 0; i < config_.sample_prompts.size(); ++i) {
        std::printf("sample | %s%s\n", config_.sample_prompts[i].c_str(),
                    generate(config_.sample_prompts[i], config_.sample_tokens, step * 1000 + i).c_str());
      }
    }
  }
  result.best_val_loss = best_val_loss_;
  result.final_step = step;
  if (options.print && !result.stopped_on_nonfinite) {
    for (size_t i = 0; i < config_.sample_prompts.size(); ++i) {
      std::printf("sample | %s%s\n", config_.sample_prompts[i].c_str(),
                  generate(config_.sample_prompts[i], config_.sample_tokens, i).c_str());
    }
  }
  return result;
}

int run_pretraining(const TrainConfig& config, const RunOptions& options) {
  if (config.device == "cuda") require_cuda_device();  // fail before loading any data
  const std::unique_ptr<data::Tokenizer> tokenizer_owner = data::make_tokenizer(config.model.tokenizer_name);
  const data::Tokenizer& tokenizer = *tokenizer_owner;
  if (config.model.vocab_size < tokenizer.vocab_size()) {
    throw ConfigError("model vocab_size " + std::to_string(config.model.vocab_size) +
                      " is smaller than the " + tokenizer.name() + " tokenizer's " +
                      std::to_string(tokenizer.vocab_size()));
  }
  data::LoadOptions load;
  load.model_vocab_size = config.model.vocab_size;
  load.skip_bad_lines = config.skip_bad_lines;
  const auto train_sets = data::load_datasets(config.datasets, tokenizer, load);
  data::LoaderOptions lo;
  lo.B = config.batch_size;
  lo.T = config.resolved_seq_len();
  lo.seed = config.seed;
  lo.val_fraction = config.val_datasets.empty() ? config.val_fraction : 0.0;
  lo.split = data::Split::kTrain;
  data::PrefetchLoader train(std::make_unique<data::PretrainLoader>(train_sets, lo), config.prefetch);
  std::unique_ptr<data::BatchSource> val;
  if (!config.val_datasets.empty()) {
    data::LoaderOptions vo = lo;
    vo.split = data::Split::kAll;
    val =
        std::make_unique<data::PretrainLoader>(data::load_datasets(config.val_datasets, tokenizer, load), vo);
  } else if (config.val_fraction > 0.0) {
    data::LoaderOptions vo = lo;
    vo.split = data::Split::kValidation;
    val = std::make_unique<data::PretrainLoader>(train_sets, vo);
  }

  BackendOptions bo;
  bo.max_batch = config.batch_size;
  bo.max_seq = config.resolved_seq_len();
  bo.recompute = config.recompute;
  bo.seed = config.seed;
  bo.weight_decay = config.weight_decay;
  bo.no_decay_names = config.no_decay_names;
  bo.decay_names = config.decay_names;
  const std::unique_ptr<TrainBackend> backend_owner =
      make_backend(config.device, config.model, config.optimizer, bo);
  TrainBackend& backend = *backend_owner;
  if (options.print) {
    const ParameterCount count = count_parameters(config.model);
    std::printf("model: %.2fM parameters, %d layers, d_model %d, %s/%s/%s/%s | device %s | optimizer %s\n",
                count.total() / 1e6, config.model.n_layers, config.model.d_model,
                config.model.positional_encoding.c_str(), config.model.attention_type.c_str(),
                config.model.norm_type.c_str(), config.model.activation.c_str(), backend.name().c_str(),
                backend.optimizer_name().c_str());
    std::printf("memory plan: %s\n", backend.memory_plan().describe().c_str());
    std::printf("batch %d x seq %d x accumulation %d = %d tokens per step\n", config.batch_size,
                config.resolved_seq_len(), config.gradient_accumulation_steps,
                config.batch_size * config.resolved_seq_len() * config.gradient_accumulation_steps);
  }
  Trainer trainer(config, backend, train, val.get(), tokenizer);
  const RunResult result = trainer.run(options);
  return result.stopped_on_nonfinite ? 1 : 0;
}

}  // namespace llm
