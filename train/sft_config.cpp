#include "train/sft_config.h"

#include <algorithm>
#include <cmath>

namespace llm {

SftConfig sft_config_from_json(const json& object, const std::string& origin, const std::string& base_dir) {
  SftConfig s;
  TrainConfig& c = s.train;
  // LLM-Lab's SFT defaults, where they differ from pretraining's.
  c.max_steps = 5000;
  c.lr = 5e-6;
  c.weight_decay = 0.01;
  c.batch_size = 4;
  c.gradient_accumulation_steps = 16;
  c.warmup_steps = 100;
  c.eval_steps = 50;
  c.output_dir = "sft_checkpoints";
  c.val_fraction = 0.05;
  c.source = object;

  KeyReader r(object, origin);
  r.get("base_model", s.base_model);
  const ModelKeys model = read_model_keys(r, object, origin, base_dir, c);
  const bool have_model = model.valid;
  if (!s.base_model.empty() && model.given) {
    r.problem("base_model",
              "give either \"base_model\" (a model folder or checkpoint) or \"model\" / \"model_config\" "
              "(random weights), not both");
  } else if (s.base_model.empty() && !model.given) {
    r.problem("base_model",
              "missing: give the model to fine-tune (a Hugging Face folder or a checkpoint), or \"model\" "
              "for random weights");
  }

  r.get("train_file", s.train_file);
  r.get("val_file", s.val_file);
  r.get("val_fraction", c.val_fraction);
  r.get("chat_template", s.data.chat_template);
  r.get("drop_system_prompt", s.data.drop_system_prompt);
  r.get("enable_thinking", s.data.enable_thinking);
  r.get("completion_only_loss", s.data.completion_only_loss);
  s.max_length_given = r.get("max_length", s.data.max_length);
  r.get("skip_bad_lines", s.data.skip_bad_lines);
  c.skip_bad_lines = s.data.skip_bad_lines;
  r.get("packing", s.packing);
  r.get("num_train_epochs", s.num_train_epochs);
  r.get("warmup_ratio", s.warmup_ratio);
  r.get("neftune_noise_alpha", s.neftune_noise_alpha);
  s.max_steps_given = object.is_object() && object.contains("max_steps") && !object["max_steps"].is_null();

  read_training_keys(r, c);
  // LLM-Lab's SFT spellings.
  const bool lr_given = object.is_object() && object.contains("lr") && !object["lr"].is_null();
  if (r.get("learning_rate", c.lr) && lr_given) r.problem("learning_rate", "give either lr or learning_rate");
  const bool clip_given =
      object.is_object() && object.contains("grad_clip") && !object["grad_clip"].is_null();
  if (r.get("max_grad_norm", c.grad_clip) && clip_given)
    r.problem("max_grad_norm", "give either grad_clip or max_grad_norm");

  r.get("use_lora", s.lora.enabled);
  const bool preset_given =
      r.get_choice("lora_preset", s.lora.preset, {"minimal", "attention_only", "ffn_only", "all", "custom"});
  // PEFT's target_modules is a list or one string ("all-linear" is the common one).
  bool modules_given = false;
  if (object.is_object() && object.contains("lora_target_modules") &&
      object["lora_target_modules"].is_string()) {
    std::string module;
    modules_given = r.get("lora_target_modules", module);
    s.lora.target_modules = {module};
  } else {
    modules_given = r.get("lora_target_modules", s.lora.target_modules);
  }
  // Target modules alone (as a PEFT LoraConfig gives them) mean the custom preset.
  if (modules_given && !preset_given) s.lora.preset = "custom";
  r.get("lora_r", s.lora.r);
  r.get("lora_alpha", s.lora.alpha);
  r.get("lora_dropout", s.lora.dropout);
  r.get("use_rslora", s.lora.rslora);
  s.lora.init_seed = c.seed;

  bool load_in_4bit = false;
  r.get("load_in_4bit", load_in_4bit);
  std::string quantization = "none";
  r.get_choice("quantization", quantization, {"none", "nf4"});
  r.get("bnb_4bit_use_double_quant", s.quant.double_quant);
  std::string quant_type = "nf4";
  if (r.get("bnb_4bit_quant_type", quant_type) && quant_type != "nf4") {
    r.problem("bnb_4bit_quant_type", "only \"nf4\" is supported, found \"" + quant_type + "\"");
  }
  s.quant.nf4 = load_in_4bit || quantization == "nf4";

  if (r.problems().empty()) {
    check_training_keys(r, c);
    if (!(c.val_fraction >= 0.0 && c.val_fraction < 1.0)) r.problem("val_fraction", "must be in [0, 1)");
    if (have_model && !s.max_length_given)
      s.data.max_length = std::min(s.data.max_length, c.model.max_seq_len);
    if (s.data.max_length < 2) r.problem("max_length", "must be at least 2");
    if (have_model && s.data.max_length > c.model.max_seq_len) {
      r.problem("max_length", "(" + std::to_string(s.data.max_length) +
                                  ") exceeds the model's max_seq_len (" +
                                  std::to_string(c.model.max_seq_len) + ")");
    }
    if (s.num_train_epochs < 0.0) r.problem("num_train_epochs", "must not be negative");
    if (!(s.warmup_ratio >= 0.0 && s.warmup_ratio < 1.0)) r.problem("warmup_ratio", "must be in [0, 1)");
    if (!(s.neftune_noise_alpha >= 0.0 && s.neftune_noise_alpha <= 1e4))
      r.problem("neftune_noise_alpha", "must be in [0, 1e4] (0 turns NEFTune off; the paper uses 5 to 15)");
    if (s.lora.enabled) {
      try {
        validate_lora_settings(s.lora);
      } catch (const ConfigError& e) {
        r.problems_add(e.what());
      }
    } else if (object.is_object()) {
      for (const char* key :
           {"lora_preset", "lora_target_modules", "lora_r", "lora_alpha", "lora_dropout", "use_rslora"}) {
        if (object.contains(key) && !object[key].is_null())
          r.problem(key, "has no effect without \"use_lora\": true");
      }
    }
    if (!s.lora.target_modules.empty() && s.lora.preset != "custom") {
      r.problem("lora_target_modules", "is used only with \"lora_preset\": \"custom\"");
    }
    if (s.quant.nf4 && !s.lora.enabled) {
      r.problem(load_in_4bit ? "load_in_4bit" : "quantization",
                "QLoRA trains LoRA adapters on a frozen NF4 base: set \"use_lora\": true as well");
    }
  }
  r.finish();
  return s;
}

SftConfig load_sft_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::string base_dir;
  const json object = read_config_file(path, overrides, base_dir);
  return sft_config_from_json(object, path, base_dir);
}

}  // namespace llm
