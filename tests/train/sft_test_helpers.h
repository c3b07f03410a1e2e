// What the SFT tests (test_sft on the CPU, test_cuda_lora on the GPU) share: a fresh temporary folder,
// the tiny LoRA run config, quiet run options and readers for what a run leaves behind.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "llm/json_config.h"
#include "train/checkpoint.h"
#include "train/sft.h"

namespace llm::test {

// An empty folder under the temporary directory, named after the test and the process.
inline std::string fresh_temp_dir(const std::string& prefix, const std::string& name) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / (prefix + "_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

// A tiny byte-vocabulary model for SFT runs from random weights.
inline json tiny_sft_model_json(int d_model = 16, int d_ff = 24) {
  return json{{"vocab_size", 260}, {"d_model", d_model}, {"n_heads", 2},      {"n_kv_heads", 1},
              {"d_ff", d_ff},      {"n_layers", 2},      {"max_seq_len", 256}};
}

// Six LoRA steps on the built-in chats: packed rows, LoRA dropout, accumulation 2, an evaluation at
// step 3 and 6, and a checkpoint at every second step (numbered ones kept).
inline json tiny_sft_run_config(const json& model, const std::string& out, const std::string& device) {
  return json{
      {"model", model},          {"max_length", 160}, {"batch_size", 3},   {"gradient_accumulation_steps", 2},
      {"max_steps", 6},          {"lr", 3e-3},        {"warmup_steps", 1}, {"use_lora", true},
      {"lora_preset", "all"},    {"lora_r", 4},       {"lora_alpha", 8},   {"lora_dropout", 0.1},
      {"packing", true},         {"eval_every", 3},   {"eval_steps", 2},   {"save_every", 2},
      {"save_best_only", false}, {"log_every", 1},    {"output_dir", out}, {"device", device}};
}

inline SftRunOptions quiet() {
  SftRunOptions o;
  o.run.print = false;
  return o;
}

// Every parameter array of a checkpoint, concatenated in file order (the optimizer state left out).
inline std::vector<float> checkpoint_params(const std::string& path) {
  std::vector<float> all;
  for (const auto& a : read_checkpoint(path).arrays) {
    if (a.kind == "param") all.insert(all.end(), a.data.begin(), a.data.end());
  }
  return all;
}

}  // namespace llm::test
