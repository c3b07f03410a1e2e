// Named parameter tensors in one arena.
//
// Every parameter has a name (Hugging Face's Llama/Qwen naming, so checkpoints map one to one), a
// shape, a role and a trainable flag. Weight decay, optimizer grouping, LoRA targeting and "only
// trainable tensors get gradients and optimizer state" all follow from these fields, never from a
// fixed list of slots.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "llm/config.h"

namespace llm {

// kLora: a LoRA adapter matrix (lora_A or lora_B, see llm/lora.h), appended after the base tensors.
enum class TensorRole { kMatrix, kEmbedding, kPosition, kNorm, kBias, kHead, kLora };
const char* role_name(TensorRole role);

struct TensorInfo {
  std::string name;
  std::vector<int64_t> shape;
  TensorRole role = TensorRole::kMatrix;
  bool trainable = true;
  int64_t numel = 0;
  size_t offset = 0;       // element offset in the parameter arena
  size_t grad_offset = 0;  // element offset in the gradient arena (trainable tensors only)
};

// The list of tensors a config needs, with their offsets in the parameter and gradient arenas.
class ParameterLayout {
 public:
  explicit ParameterLayout(const ModelConfig& config);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // The tensor called `name`; throws std::out_of_range naming it when there is none.
  const TensorInfo& at(const std::string& name) const;
  bool contains(const std::string& name) const;
  size_t total_elements() const { return total_; }
  size_t trainable_elements() const { return trainable_total_; }

  // Freezes or unfreezes a tensor; gradient offsets are recomputed so that frozen tensors take no
  // gradient memory.
  void set_trainable(const std::string& name, bool trainable);
  // Appends a tensor after all existing ones (LoRA adapters), so the offsets of the tensors before it do
  // not change. Throws std::invalid_argument when the name is taken.
  void append(const std::string& name, std::vector<int64_t> shape, TensorRole role);

 private:
  void add(const std::string& name, std::vector<int64_t> shape, TensorRole role);
  void assign_gradient_offsets();

  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;  // name -> position in tensors_
  size_t total_ = 0;
  size_t trainable_total_ = 0;
};

// "model.layers.3.self_attn.q_proj.weight" and friends.
std::string layer_tensor_name(int layer, const std::string& suffix);

// The trainable tensors of a whole parameter arena (layout order), each at its grad_offset:
// layout.trainable_elements() values (what a LoRA checkpoint holds).
std::vector<float> gather_trainable(const ParameterLayout& layout, const float* arena);
// The reverse: each trainable tensor from `trainable` (at its grad_offset) into the arena.
void scatter_trainable(const ParameterLayout& layout, const float* trainable, float* arena);

}  // namespace llm
