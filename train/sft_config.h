// The SFT config: the shared training keys (train/train_config.h) with LLM-Lab's SFT defaults, the base
// model, the chat data and how it is batched, LoRA and QLoRA. Read strictly: an unknown key is an error
// that suggests the nearest known one.
//
// The base model is a Hugging Face folder or one of our checkpoints ("base_model"); without one, an
// inline "model" (or "model_config") starts from random weights, which is for tests and demos.
// LLM-Lab's SFT names "learning_rate" and "max_grad_norm" are accepted beside "lr" and "grad_clip".
#pragma once

#include <string>
#include <vector>

#include "data/sft_dataset.h"
#include "llm/lora.h"
#include "train/train_config.h"

namespace llm {

struct SftConfig {
  TrainConfig train;       // shared keys; train.model is the base model's architecture
  std::string base_model;  // HF folder or .ckpt; "" starts from random weights ("model" required)

  std::string train_file = "builtin:arithmetic_sft";  // .jsonl, or the built-in arithmetic chats
  std::string val_file;                               // "": hold out train.val_fraction of train_file
  data::SftOptions data;                              // chat template, masking, max_length, ...
  bool packing = false;

  double num_train_epochs = 0.0;     // > 0: max_steps follows from the epochs (unless max_steps is given)
  double warmup_ratio = 0.0;         // > 0: warmup_steps = ceil(warmup_ratio * max_steps)
  double neftune_noise_alpha = 0.0;  // > 0: NEFTune noise on the embeddings in training (TRL's key)

  LoraSettings lora;
  QuantSettings quant;
  bool max_steps_given = false;   // "max_steps" was in the config (it wins over num_train_epochs)
  bool max_length_given = false;  // else max_length is min(1024, the model's max_seq_len)
};

// Throws ConfigError listing every problem. `base_dir` resolves a relative "model_config".
SftConfig sft_config_from_json(const json& object, const std::string& origin,
                               const std::string& base_dir = ".");
SftConfig load_sft_config(const std::string& path, const std::vector<std::string>& overrides = {});

}  // namespace llm
