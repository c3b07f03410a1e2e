// Supervised fine-tuning: ./train_sft. The base model (a Hugging Face folder or our checkpoint) is
// loaded, optionally with LoRA adapters on a frozen base and an NF4-quantised base (QLoRA); the chat
// data is rendered, masked, packed and batched (data/sft_dataset.h, data/sft_loader.h); and the shared
// Trainer loop (train/trainer.h) runs the steps, evaluations and checkpoints.
//
// Outputs in output_dir: latest.ckpt and best.ckpt (the trainer state: the trainable tensors, which with
// LoRA are the adapters alone, the frozen base named by its fingerprint; optimizer state; data
// position), metrics.jsonl, and with LoRA the adapters in PEFT's layout:
// best_lora_adapters/ (best validation loss) and final_lora_adapters/ (the last step); a full fine-tune
// writes Hugging Face folders best_model/ and final_model/ instead (in the base folder's dtype).
// Re-running the same command after a kill resumes from output_dir/latest.ckpt.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "data/loader.h"
#include "data/sft_loader.h"
#include "train/sft_config.h"
#include "train/trainer.h"

namespace llm {

// SFT batches as the Trainer's BatchSource: packed rows keep their per-document positions and document
// ids, and num_tokens counts real (non-padding) tokens, so tokens/s excludes padding.
class SftBatchSource final : public data::BatchSource {
 public:
  SftBatchSource(std::shared_ptr<const data::SftDataset> dataset, const data::SftLoaderOptions& options)
      : loader_(std::move(dataset), options) {}
  data::Batch next() override;
  json state() const override { return loader_.state(); }
  void restore(const json& state) override { loader_.restore(state); }
  void reset() override { loader_.reset(); }
  const data::SftLoader& loader() const { return loader_; }

 private:
  data::SftLoader loader_;
};

struct SftRunOptions {
  RunOptions run;
  bool fresh = false;  // ignore output_dir/latest.ckpt and start over
};

// The base model's architecture from base_model, an HF folder (config.json and safetensors) or one of our
// checkpoints, and the parameters (ParameterLayout(config) order) of a checkpoint; an HF folder's weights
// are only checked, and an empty vector comes back (run_sft streams them, read_hf_tensors).
// `tokenizer_spec` receives where the tokenizer comes from (the folder, or the checkpoint's
// tokenizer_name). Throws with the path named.
std::vector<float> load_base_model(const std::string& base_model, ModelConfig& config,
                                   std::string& tokenizer_spec);

// What ./train_sft does. Returns the process exit code.
int run_sft(SftConfig config, const SftRunOptions& options);

}  // namespace llm
