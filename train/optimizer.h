// The optimizer interface and AdamW.
//
// An optimizer sees the trainable tensors as (parameter, gradient) views with their role and their
// group's hyperparameters. Groups follow the roles: norms and biases get no weight decay; Muon sends
// 2-D hidden matrices to Muon and the rest to AdamW. The step is a function of the flat views only,
// so a future ZeRO-1 shard can call it on its own slice.
//
// The other optimizers live in train/optim_*.h, one per file, each opening with its algorithm and
// defaults: Lion (optim_lion.h), Muon (optim_muon.h), SophiaG (optim_sophia.h), Adafactor
// (optim_adafactor.h) and 8-bit AdamW (optim_adamw8bit.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llm/json_config.h"
#include "llm/params.h"

namespace llm {

// One trainable tensor as the optimizer sees it.
struct ParamView {
  const TensorInfo* info = nullptr;
  float* param = nullptr;
  const float* grad = nullptr;
  double weight_decay = 0.0;  // this tensor's group value (0 for norms and biases)
  double lr_scale = 1.0;      // multiplies the scheduled learning rate
};

// A named piece of optimizer state, saved in checkpoints as it is.
struct StateBuffer {
  std::string name;
  std::vector<float> data;
};

// The expected name and length of one state buffer, and the tensor it belongs to (for messages).
struct StateSlot {
  std::string name;
  size_t size = 0;
  std::string tensor;
};
// Checks a state about to be loaded against the slots an optimizer expects: the count, then each name
// and length. Throws std::runtime_error with one clear line, saying when the state evidently comes
// from another optimizer (its buffer names carry another optimizer's prefix).
void check_state_layout(const std::string& optimizer, const std::vector<StateBuffer>& state,
                        const std::vector<StateSlot>& expected);

// Every optimizer hyperparameter, with LLM-Lab's names and defaults.
struct OptimizerConfig {
  std::string name = "adamw";  // adamw | adamw_8bit | lion | muon | sophia | adafactor
  double adamw_beta1 = 0.9, adamw_beta2 = 0.999, adamw_eps = 1e-8;
  double lion_beta1 = 0.9, lion_beta2 = 0.99;
  double muon_momentum = 0.95;
  bool muon_nesterov = true;
  int muon_ns_steps = 5;
  double muon_adamw_lr_scale = 0.1;  // the AdamW side of Muon runs at 0.1x the learning rate
  // CPU only: the precision of the Newton-Schulz iteration, fp64 | fp32 | bf16 (the GPU, like Keller
  // Jordan's reference, runs it in bf16; see train/optim_muon.h).
  std::string muon_ns_precision = "fp64";
  double sophia_beta1 = 0.965, sophia_beta2 = 0.99, sophia_rho = 0.04;
  int sophia_k = 10;
  // Adafactor, as in transformers.optimization.Adafactor (its defaults, except that the scheduled
  // learning rate is used unless adafactor_relative_step is set).
  double adafactor_eps1 = 1e-30, adafactor_eps2 = 1e-3, adafactor_clip_threshold = 1.0;
  double adafactor_decay_rate = -0.8, adafactor_beta1 = 0.0;  // beta1 0 means no first moment
  bool adafactor_scale_parameter = true, adafactor_relative_step = false, adafactor_warmup_init = false;
  int adamw_8bit_block_size = 256;
};

// Reads the optimizer keys from a training config (the KeyReader marks them as known).
void read_optimizer_config(KeyReader& reader, OptimizerConfig& config);
// Range checks; one message per problem.
std::vector<std::string> validate_optimizer_config(const OptimizerConfig& config);

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual std::string name() const = 0;
  // Bytes of state per trainable parameter (for the memory plan).
  virtual double state_bytes_per_param() const = 0;
  // Prepares state for these tensors (called once, before the first step or a state load).
  virtual void init(const std::vector<ParamView>& params) = 0;
  // One update with the scheduled learning rate `lr`; `step` counts from 1.
  virtual void step(const std::vector<ParamView>& params, double lr, int64_t step) = 0;
  virtual std::vector<StateBuffer> state() const = 0;
  // Restores what state() returned; throws std::runtime_error naming the buffer that does not fit.
  virtual void load_state(const std::vector<StateBuffer>& state) = 0;

  // Second-order hooks (Sophia): whether this step wants a Hessian-diagonal estimate, and the update
  // of that estimate from gradients of labels sampled from the model (Gauss-Newton-Bartlett).
  // The trainer asks after step(params, lr, step) returns; when true it computes the gradients of the
  // sampled-label loss into the gradient buffers and calls update_hessian_estimate.
  virtual bool wants_hessian_estimate(int64_t /*step*/) const { return false; }
  virtual void update_hessian_estimate(const std::vector<ParamView>& /*params*/, int /*batch_tokens*/) {}
};

// AdamW with decoupled weight decay (Loshchilov and Hutter), as torch.optim.AdamW computes it:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p = p - lr wd p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
class AdamW : public Optimizer {
 public:
  AdamW(double beta1, double beta2, double eps) : beta1_(beta1), beta2_(beta2), eps_(eps) {}
  std::string name() const override { return "adamw"; }
  double state_bytes_per_param() const override { return 8.0; }
  void init(const std::vector<ParamView>& params) override;
  void step(const std::vector<ParamView>& params, double lr, int64_t step) override;
  std::vector<StateBuffer> state() const override;
  void load_state(const std::vector<StateBuffer>& state) override;

 private:
  std::vector<StateSlot> slots() const;

  double beta1_, beta2_, eps_;
  std::vector<std::vector<float>> m_, v_;  // one per tensor
  std::vector<std::string> tensor_names_;
};

// Builds the optimizer named by the config. Throws ConfigError for an unknown name, suggesting the
// nearest known one.
std::unique_ptr<Optimizer> make_optimizer(const OptimizerConfig& config);
// The names make_optimizer accepts.
const std::vector<std::string>& optimizer_names();

// The views of every trainable tensor with its group's hyperparameters: `weight_decay` for matrices,
// embeddings and the head; none for norms and biases; `no_decay_names` and `decay_names` (exact
// tensor names or substrings) override the role-based choice. params and grads may both be null when
// only the groups are wanted (the views' pointers are then null).
std::vector<ParamView> make_param_views(const ParameterLayout& layout, float* params, const float* grads,
                                        double weight_decay,
                                        const std::vector<std::string>& no_decay_names = {},
                                        const std::vector<std::string>& decay_names = {});

}  // namespace llm
