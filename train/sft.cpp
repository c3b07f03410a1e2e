#include "train/sft.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "data/chat_template.h"
#include "data/tokenizer_factory.h"
#include "llm/hf_config.h"
#include "llm/hf_model.h"
#include "llm/lora_adapter.h"
#include "train/checkpoint.h"
#include "train/cpu_backend.h"
#include "train/cuda_backend.h"

namespace llm {

namespace {

bool is_dir(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// The end-of-turn text of a chat format: where a sampled reply stops.
std::string end_of_turn(const data::ChatTemplate& t) {
  return t.format == data::ChatFormat::kLlama3 ? "<|eot_id|>" : "<|im_end|>";
}

}  // namespace

data::Batch SftBatchSource::next() {
  data::SftBatch s = loader_.next();
  data::Batch b;
  b.B = s.B;
  b.T = s.T;
  b.inputs = std::move(s.inputs);
  b.targets = std::move(s.targets);
  b.positions = std::move(s.positions);
  b.doc_ids = std::move(s.doc_ids);
  b.num_tokens = s.num_real_tokens;
  b.state_after = std::move(s.state_after);
  return b;
}

// The base model's config and tokenizer, and the weights of our checkpoint. A Hugging Face folder's
// weights are only checked here (an empty vector comes back): run_sft streams them into the backend.
std::vector<float> load_base_model(const std::string& base_model, ModelConfig& config,
                                   std::string& tokenizer_spec) {
  if (is_dir(base_model)) {
    const HfConfigImport hf = load_hf_config(base_model);
    config = hf.config;
    for (const auto& note : hf.notes) std::printf("note: %s: %s\n", base_model.c_str(), note.c_str());
    std::vector<std::string> notes;
    check_hf_parameters(base_model, config, &notes);
    for (const auto& note : notes) std::printf("note: %s: %s\n", base_model.c_str(), note.c_str());
    if (!is_file(base_model + "/tokenizer.json")) {
      throw ConfigError("base_model: " + base_model +
                        " has no tokenizer.json; copy the tokenizer files of the model into the folder");
    }
    tokenizer_spec = base_model;
    return {};
  }
  if (!is_file(base_model)) {
    throw ConfigError("base_model: \"" + base_model +
                      "\" is neither a Hugging Face model folder nor a checkpoint file");
  }
  Checkpoint ck = read_checkpoint(base_model, false);
  if (!ck.meta.contains("model")) throw CheckpointError(base_model + ": the header has no model config");
  const std::string lora_hint = lora_checkpoint_hint(base_model, ck.meta);
  if (!lora_hint.empty()) throw CheckpointError(base_model + ": " + lora_hint);
  config = model_config_from_json(ck.meta["model"], base_model + ": model");
  const ParameterLayout layout(config);
  std::vector<float> params(layout.total_elements());
  std::vector<bool> seen(layout.tensors().size(), false);
  size_t found = 0;
  // Each tensor is freed once copied: the host holds the parameters about once, not twice.
  for (auto& a : ck.arrays) {
    if (a.kind != "param") continue;
    if (!layout.contains(a.name)) {
      throw CheckpointError(
          base_model + ": tensor " + a.name +
          " is not part of the base model (a LoRA checkpoint? merge it with ./merge_lora first)");
    }
    const TensorInfo& t = layout.at(a.name);
    if (a.shape != t.shape) throw CheckpointError(base_model + ": tensor " + a.name + " has the wrong shape");
    const size_t index = static_cast<size_t>(&t - layout.tensors().data());
    if (seen[index]) throw CheckpointError(base_model + ": tensor " + a.name + " appears twice");
    seen[index] = true;
    std::copy(a.data.begin(), a.data.end(), params.begin() + t.offset);
    std::vector<float>().swap(a.data);
    ++found;
  }
  if (found != layout.tensors().size())
    throw CheckpointError(base_model + ": some parameter tensors are missing");
  tokenizer_spec = config.tokenizer_name;
  return params;
}

int run_sft(SftConfig config, const SftRunOptions& options) {
  TrainConfig& tc = config.train;
  if (tc.device == "cuda") require_cuda_device();
  // "auto": the GPU when one is usable, for full fine-tuning, LoRA and QLoRA alike.
  const std::string device = resolve_device(tc.device);
  const bool print = options.run.print;

  // The base model and its tokenizer; a full fine-tune is exported in the base folder's dtype.
  SafeDType base_dtype = SafeDType::kF32;
  if (is_dir(config.base_model)) {
    const std::string torch_dtype = load_hf_config(config.base_model).torch_dtype;
    if (torch_dtype == "bfloat16") base_dtype = SafeDType::kBF16;
    if (torch_dtype == "float16") base_dtype = SafeDType::kF16;
  }
  std::vector<float> base;
  std::string tokenizer_spec = tc.model.tokenizer_name;
  if (!config.base_model.empty()) base = load_base_model(config.base_model, tc.model, tokenizer_spec);
  if (!config.max_length_given)
    config.data.max_length = std::min(config.data.max_length, tc.model.max_seq_len);
  if (config.data.max_length > tc.model.max_seq_len) {
    throw ConfigError("max_length (" + std::to_string(config.data.max_length) +
                      ") exceeds the model's max_seq_len (" + std::to_string(tc.model.max_seq_len) + ")");
  }
  const std::unique_ptr<data::Tokenizer> tokenizer = data::make_tokenizer(tokenizer_spec);
  if (tc.model.vocab_size < tokenizer->vocab_size()) {
    throw ConfigError("model vocab_size " + std::to_string(tc.model.vocab_size) + " is smaller than the " +
                      tokenizer->name() + " tokenizer's " + std::to_string(tokenizer->vocab_size()));
  }

  // The chat template: the config's, else the base folder's own, else ChatML.
  data::SftOptions data_options = config.data;
  data_options.model_vocab_size = tc.model.vocab_size;
  if (data_options.chat_template.empty()) {
    data_options.chat_template = "chatml";
    if (is_dir(tokenizer_spec)) {
      try {
        data::load_chat_template(tokenizer_spec);
        data_options.chat_template = tokenizer_spec;
      } catch (const std::exception& e) {
        if (print) std::printf("note: %s; using the chatml template\n", e.what());
      }
    }
  }
  const data::ChatTemplate chat_template = data::load_chat_template(data_options.chat_template);
  if (print && chat_template.date_from_clock) {
    std::printf(
        "note: the chat template writes today's date in its system header under transformers; this run "
        "writes "
        "\"%s\" (the template's fallback), so that the data renders the same on every day and a resume is "
        "exact\n",
        chat_template.date.c_str());
  }

  const auto train_set = data::load_sft_dataset(config.train_file, *tokenizer, data_options);
  data::SftLoaderOptions lo;
  lo.B = tc.batch_size;
  lo.max_length = config.data.max_length;
  lo.packing = config.packing;
  lo.pad_id = std::max(0, tokenizer->pad_id());
  lo.seed = tc.seed;
  lo.val_fraction = config.val_file.empty() ? tc.val_fraction : 0.0;
  lo.split = data::Split::kTrain;
  SftBatchSource train(train_set, lo);
  std::unique_ptr<SftBatchSource> val;
  std::shared_ptr<const data::SftDataset> val_set = train_set;
  data::SftLoaderOptions vo = lo;
  vo.shuffle = false;
  if (!config.val_file.empty()) {
    val_set = data::load_sft_dataset(config.val_file, *tokenizer, data_options);
    vo.split = data::Split::kAll;
    val = std::make_unique<SftBatchSource>(val_set, vo);
  } else if (tc.val_fraction > 0.0) {
    vo.split = data::Split::kValidation;
    val = std::make_unique<SftBatchSource>(train_set, vo);
  }
  if (val) {
    // One pass over the validation examples at most: more would count some twice.
    tc.eval_steps = static_cast<int>(std::min<int64_t>(tc.eval_steps, val->loader().steps_per_epoch()));
  }

  // Steps from epochs, warmup from its ratio.
  const int64_t steps_per_epoch = train.loader().steps_per_epoch();
  const int64_t optimizer_steps_per_epoch =
      (steps_per_epoch + tc.gradient_accumulation_steps - 1) / tc.gradient_accumulation_steps;
  if (config.num_train_epochs > 0.0 && !config.max_steps_given) {
    tc.max_steps = std::max<int64_t>(
        1, static_cast<int64_t>(std::ceil(config.num_train_epochs * optimizer_steps_per_epoch)));
  }
  if (config.warmup_ratio > 0.0)
    tc.warmup_steps = static_cast<int64_t>(std::ceil(config.warmup_ratio * tc.max_steps));

  // Padding efficiency of one epoch of training batches, measured on a copy of the loader.
  double real = 0.0, slots = 0.0;
  {
    data::SftLoader probe(train_set, lo);
    for (int64_t i = 0; i < steps_per_epoch; ++i) {
      const data::SftBatch b = probe.next();
      real += static_cast<double>(b.num_real_tokens);
      slots += static_cast<double>(b.B) * b.T;
    }
  }

  BackendOptions bo;
  bo.max_batch = tc.batch_size;
  bo.max_seq = config.data.max_length;
  bo.recompute = tc.recompute;
  bo.seed = tc.seed;
  bo.weight_decay = tc.weight_decay;
  bo.no_decay_names = tc.no_decay_names;
  bo.decay_names = tc.decay_names;
  bo.lora = config.lora;
  bo.quant = config.quant;
  bo.neftune_alpha = config.neftune_noise_alpha;
  bo.init_base = config.base_model.empty();  // a base model's weights are written below
  const std::unique_ptr<TrainBackend> backend = make_backend(device, tc.model, tc.optimizer, bo);
  // LoRA: checkpoints leave the frozen base out and name it by a fingerprint of its values (before NF4
  // quantisation, which is deterministic), checked on resume.
  json frozen_base;
  if (is_dir(config.base_model)) {
    // A Hugging Face folder, one tensor at a time: the host never holds the whole base.
    FrozenFingerprint fingerprint;
    read_hf_tensors(config.base_model, tc.model, nullptr,
                    [&](const TensorInfo& t, const std::vector<float>& values) {
                      if (!backend->layout().at(t.name).trainable)
                        fingerprint.add(values.data(), values.size());
                      backend->write_tensor(t.name, values);
                    });
    if (config.lora.enabled) frozen_base["fingerprint"] = fingerprint.hex();
  } else if (!base.empty()) {
    // The base tensors come first in the layout, the adapters (initialised by the backend) after them.
    if (config.lora.enabled) {
      frozen_base["fingerprint"] = frozen_tensors_fingerprint(backend->layout(), base.data(), base.size());
    }
    backend->write_base_parameters(base);
    std::vector<float>().swap(base);  // the backend holds the values now
  } else if (config.lora.enabled) {
    const std::vector<float> all = backend->read_parameters();
    frozen_base["fingerprint"] = frozen_tensors_fingerprint(backend->layout(), all.data(), all.size());
  }
  if (config.lora.enabled) {
    frozen_base["source"] = config.base_model.empty() ? "random init" : config.base_model;
    frozen_base["nf4"] = config.quant.nf4;
    frozen_base["double_quant"] = config.quant.nf4 && config.quant.double_quant;
    if (config.quant.nf4) frozen_base["nf4_blocksize"] = config.quant.blocksize;
  }
  if (config.quant.nf4) backend->quantize_base_nf4();

  if (print) {
    const ParameterCount count = count_parameters(tc.model);
    size_t trainable = 0;
    for (const auto& t : backend->layout().tensors())
      trainable += t.trainable ? static_cast<size_t>(t.numel) : 0;
    std::printf("model: %.2fM parameters (%s), %d layers, d_model %d | device %s | optimizer %s\n",
                count.total() / 1e6, config.base_model.empty() ? "random init" : config.base_model.c_str(),
                tc.model.n_layers, tc.model.d_model, backend->name().c_str(),
                backend->optimizer_name().c_str());
    if (config.lora.enabled) {
      std::printf(
          "lora: preset %s, r %d, alpha %g%s, dropout %g | %zu trainable parameters (%.3f%% of %zu)%s\n",
          config.lora.preset.c_str(), config.lora.r, config.lora.alpha, config.lora.rslora ? " (rsLoRA)" : "",
          config.lora.dropout, trainable, 100.0 * trainable / backend->layout().total_elements(),
          backend->layout().total_elements(),
          config.quant.nf4
              ? (config.quant.double_quant ? " | base in NF4, double quantised" : " | base in NF4")
              : "");
    }
    std::printf("memory plan: %s\n", backend->memory_plan().describe().c_str());
    const data::SftStats& st = train_set->stats;
    std::printf(
        "data: %s, %lld examples (%lld truncated to %d tokens, %lld skipped lines, %lld without a target), "
        "template %s, %s loss\n",
        config.train_file.c_str(), (long long)st.examples, (long long)st.truncated, config.data.max_length,
        (long long)st.skipped_lines, (long long)st.dropped_no_target, chat_template.name.c_str(),
        config.data.completion_only_loss ? "completion-only" : "full-sequence");
    std::printf(
        "batches: %d rows x up to %d tokens%s, %lld per epoch, padding efficiency %.1f%% | %lld steps "
        "(accumulation %d), warmup %lld\n",
        tc.batch_size, config.data.max_length, config.packing ? " (packed)" : "", (long long)steps_per_epoch,
        slots > 0 ? 100.0 * real / slots : 0.0, (long long)tc.max_steps, tc.gradient_accumulation_steps,
        (long long)tc.warmup_steps);
    if (config.neftune_noise_alpha > 0.0) {
      std::printf(
          "neftune: noise alpha %g on the embeddings in training (scale alpha / sqrt(row length x %d))\n",
          config.neftune_noise_alpha, tc.model.d_model);
    }
  }

  // Sample prompts become user turns of the chat template, and a reply stops at the end of its turn.
  for (auto& prompt : tc.sample_prompts) {
    prompt = data::render_chat(chat_template, {{"user", prompt}},
                               data::RenderOptions{true, config.data.enable_thinking})
                 .text;
  }
  if (tc.sample_stop.empty()) tc.sample_stop = end_of_turn(chat_template);

  Trainer trainer(tc, *backend, train, val.get(), *tokenizer);
  trainer.frozen_base = frozen_base;
  // What the best and the last step leave besides the checkpoints: PEFT adapters with LoRA, else (full
  // fine-tuning) a Hugging Face folder with the base folder's tokenizer files.
  auto export_model = [&](const std::string& folder) {
    const std::string dir = tc.output_dir + "/" + folder;
    if (config.lora.enabled) {
      save_peft_adapter_from_trainable(dir, tc.model, config.lora, backend->layout(),
                                       backend->read_trainable_parameters(), config.base_model);
    } else {
      const std::vector<float> params = backend->read_parameters();
      HfExportOptions hf;
      hf.source_dir = is_dir(config.base_model) ? config.base_model : "";
      hf.dtype = base_dtype;
      save_hf_folder(dir, tc.model, backend->layout(), params.data(), hf);
    }
    return dir;
  };
  const char* best_folder = config.lora.enabled ? "best_lora_adapters" : "best_model";
  const char* final_folder = config.lora.enabled ? "final_lora_adapters" : "final_model";
  trainer.after_save = [&](const std::string& file, int64_t step) {
    if (file != "best.ckpt") return;
    const std::string dir = export_model(best_folder);
    if (print) std::printf("step %6lld | saved %s\n", (long long)step, dir.c_str());
  };

  RunOptions run = options.run;
  const std::string latest = tc.output_dir + "/latest.ckpt";
  if (run.resume_path.empty() && !options.fresh && is_file(latest)) {
    run.resume_path = latest;
    if (print) std::printf("found %s: resuming from it (--fresh starts over)\n", latest.c_str());
  }
  RunResult result;
  try {
    result = trainer.run(run);
  } catch (const CheckpointError& e) {
    if (run.resume_path != latest || !options.run.resume_path.empty()) throw;
    // The automatic resume found a checkpoint of another run (another model, LoRA set-up or data).
    throw CheckpointError(
        std::string(e.what()) + "\n(" + latest +
        " was picked up automatically: pass --fresh to start over, or use another output_dir)");
  }
  if (!result.stopped_on_nonfinite) {
    const std::string dir = export_model(final_folder);
    if (print) std::printf("the last step saved to %s\n", dir.c_str());
  }
  return result.stopped_on_nonfinite ? 1 : 0;
}

}  // namespace llm
