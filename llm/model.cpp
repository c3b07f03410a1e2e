#include "llm/model.h"

#include "llm/model_layout.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <stdexcept>

#include <unistd.h>

#include "kernels/cpu/activations.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/dropout.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/lora.h"
#include "kernels/cpu/nf4.h"
#include "kernels/cpu/norms.h"
#include "kernels/cpu/positions.h"
#include "kernels/philox.h"

namespace llm {

namespace {

using namespace layer;  // tensor names, dropout sites, rope_params, activation_kind

}  // namespace

template <typename T>
Model<T>::Model(const ModelConfig& config, const ModelOptions& options)
    : config_(config), options_(options), layout_(config) {
  const std::vector<std::string> problems = validate_model_config(config_);
  if (!problems.empty()) throw ConfigError(problems.front());
  if (options_.max_seq <= 0) options_.max_seq = config_.max_seq_len;
  if (options_.max_batch <= 0) throw std::invalid_argument("max_batch must be positive");
  if (options_.max_seq > config_.max_seq_len) {
    throw std::invalid_argument("sequence length " + std::to_string(options_.max_seq) +
                                " exceeds max_seq_len " + std::to_string(config_.max_seq_len));
  }
  if (options_.quant.nf4 && !options_.lora.enabled) {
    throw ConfigError(
        "NF4 quantisation (load_in_4bit) needs LoRA (use_lora: true): the quantised base weights are frozen");
  }
  if (options_.lora.enabled) {
    validate_lora_settings(options_.lora);
    lora_modules_ = llm::lora_modules(config_, options_.lora);
    add_lora_tensors(layout_, lora_modules_, options_.lora.r);
  }
  lora_index_.assign(config_.n_layers, std::vector<int>(kTensorCount, -1));
  for (size_t i = 0; i < lora_modules_.size(); ++i)
    lora_index_[lora_modules_[i].layer][lora_modules_[i].tensor] = i;
  try {
    // Where the kernel overcommits memory (vm.overcommit_memory=1), a vector larger than the machine is
    // granted and the first write to it gets the process killed: refuse such a size up front instead.
    const double bytes =
        (static_cast<double>(layout_.total_elements()) + layout_.trainable_elements()) * sizeof(T);
    const long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGE_SIZE);
    if (pages > 0 && page_size > 0 && bytes > static_cast<double>(pages) * page_size) throw std::bad_alloc();
    params_.assign(layout_.total_elements(), T(0));
    grads_.assign(layout_.trainable_elements(), T(0));
  } catch (const std::bad_alloc&) {
    throw std::runtime_error("out of memory allocating the parameters and gradients (" +
                             memory_plan(0.0).describe() + "); use a smaller model, or LoRA");
  }

  layer_names_.resize(config_.n_layers);
  for (int l = 0; l < config_.n_layers; ++l) {
    for (int i = 0; i < kTensorCount; ++i) layer_names_[l].push_back(layer_tensor_name(l, tensor_suffix(i)));
  }

  const int max_pos = config_.max_seq_len;
  if (config_.uses_rope()) {
    const int half = config_.resolved_head_dim() / 2;
    rope_cos_.resize(static_cast<size_t>(max_pos) * half);
    rope_sin_.resize(rope_cos_.size());
    ref::rope_tables(rope_cos_.data(), rope_sin_.data(), rope_params(config_), max_pos);
  }
  if (config_.positional_encoding == "sinusoidal") {
    sinusoidal_.resize(static_cast<size_t>(max_pos) * config_.d_model);
    ref::sinusoidal_table(sinusoidal_.data(), max_pos, config_.d_model);
  }
  if (config_.positional_encoding == "alibi") alibi_ = ref::alibi_slopes(config_.n_heads);
  try {
    plan_buffers();
  } catch (const std::bad_alloc&) {
    throw std::runtime_error("out of memory allocating the activations for batch " +
                             std::to_string(options_.max_batch) + " x " + std::to_string(options_.max_seq) +
                             " (" + memory_plan(0.0).describe() +
                             "); lower batch_size or the sequence length, or set recompute");
  }
}

template <typename T>
void Model<T>::plan_buffers() {
  const int B = options_.max_batch, Tm = options_.max_seq;
  const LayerActivationSizes ls = layer_activation_sizes(config_, B, Tm);
  const GlobalActivationSizes gs = global_activation_sizes(config_, B, Tm);
  residual_stride_ = static_cast<size_t>(B) * Tm * config_.d_model;
  residual_arena_.assign(residual_stride_ * (config_.n_layers + 1), T(0));

  const int saved = options_.recompute ? 1 : config_.n_layers;
  layer_arena_.assign(ls.total() * saved, T(0));
  T* cursor = layer_arena_.data();
  auto take = [&cursor](size_t n) {
    T* p = n > 0 ? cursor : nullptr;
    cursor += n;
    return p;
  };
  layers_.resize(saved);
  for (auto& b : layers_) {
    b.norm1_out = take(ls.norm1_out);
    b.norm1_mean = take(ls.norm1_mean);
    b.norm1_rstd = take(ls.norm1_rstd);
    b.q = take(ls.q);
    b.k = take(ls.k);
    b.v = take(ls.v);
    b.q_normed = take(ls.q_normed);
    b.k_normed = take(ls.k_normed);
    b.q_rstd = take(ls.q_rstd);
    b.k_rstd = take(ls.k_rstd);
    b.q_rot = take(ls.q_rot);
    b.k_rot = take(ls.k_rot);
    b.probs = take(ls.probs);
    b.attn_out = take(ls.attn_out);
    b.mid = take(ls.mid);
    b.norm2_out = take(ls.norm2_out);
    b.norm2_mean = take(ls.norm2_mean);
    b.norm2_rstd = take(ls.norm2_rstd);
    b.gate = take(ls.gate);
    b.up = take(ls.up);
    b.act = take(ls.act);
  }

  // Each adapter saves h = dropout(x) A^T, [N, r] (kept for every layer even with recompute: r is small
  // next to the layer's other activations).
  lora_offset_.assign(lora_modules_.size(), 0);
  size_t lora_total = 0;
  for (size_t i = 0; i < lora_modules_.size(); ++i) {
    lora_offset_[i] = lora_total;
    lora_total += static_cast<size_t>(B) * Tm * options_.lora.r;
  }
  lora_arena_.assign(lora_total, T(0));

  global_arena_.assign(gs.total(), T(0));
  cursor = global_arena_.data();
  auto& g = global_;
  g.final_norm_out = take(gs.final_norm_out);
  g.final_mean = take(gs.final_mean);
  g.final_rstd = take(gs.final_rstd);
  g.logits = take(gs.logits);
  g.logprobs = take(gs.logprobs);
  g.lse = take(gs.lse);
  g.branch = take(gs.branch);
  g.d_residual = take(gs.d_residual);
  g.d_norm_out = take(gs.d_norm_out);
  g.d_q = take(gs.d_q);
  g.d_k = take(gs.d_k);
  g.d_v = take(gs.d_v);
  g.d_attn_out = take(gs.d_attn_out);
  g.d_branch = take(gs.d_branch);
  g.d_q_pre = take(gs.d_q_pre);
  g.d_k_pre = take(gs.d_k_pre);
  g.d_gate = take(gs.d_gate);
  g.d_up = take(gs.d_up);
  g.d_act = take(gs.d_act);
  g.d_logits = take(gs.d_logits);
  g.d_logprobs = take(gs.d_logprobs);
}

template <typename T>
T* Model<T>::grad(const std::string& name) {
  const TensorInfo& t = layout_.at(name);
  return t.trainable ? grads_.data() + t.grad_offset : nullptr;
}

template <typename T>
void Model<T>::set_trainable(const std::string& name, bool trainable) {
  layout_.set_trainable(name, trainable);
  grads_.assign(layout_.trainable_elements(), T(0));
}

template <typename T>
void Model<T>::zero_grad() {
  std::fill(grads_.begin(), grads_.end(), T(0));
}

template <typename T>
const LoraModule* Model<T>::lora_at(int layer, int tensor) const {
  const int i = lora_index_[layer][tensor];
  return i < 0 ? nullptr : &lora_modules_[i];
}

template <typename T>
T* Model<T>::lora_hidden(int layer, int tensor) {
  return lora_arena_.data() + lora_offset_[lora_index_[layer][tensor]];
}

template <typename T>
void Model<T>::init_lora() {
  for (size_t i = 0; i < lora_modules_.size(); ++i) {
    const LoraModule& m = lora_modules_[i];
    ref::lora_init(param(m.a_name()), param(m.b_name()), m.in_features, m.out_features, options_.lora.r,
                   options_.lora.init_seed, layer::lora_init_stream(i));
  }
}

template <typename T>
void Model<T>::quantize_base_nf4() {
  if (!options_.quant.nf4)
    throw std::logic_error("quantize_base_nf4: the model was not built with quant.nf4");
  nf4_.clear();
  for (const std::string& name : nf4_quantized_tensors(config_)) {
    const size_t n = static_cast<size_t>(layout_.at(name).numel);
    const std::vector<float> w(param(name), param(name) + n);
    Nf4Tensor q = nf4_quantize_weights(w.data(), n, options_.quant);
    std::vector<float> dequantised(n);
    nf4_dequantize_weights(dequantised.data(), q, n, options_.quant);
    std::copy(dequantised.begin(), dequantised.end(), param(name));
    nf4_.emplace_back(name, std::move(q));
  }
}

template <typename T>
void Model<T>::init_weights(uint64_t seed) {
  const double residual_scale = 1.0 / std::sqrt(2.0 * config_.n_layers);
  const auto& tensors = layout_.tensors();
  for (size_t ti = 0; ti < tensors.size(); ++ti) {
    const TensorInfo& t = tensors[ti];
    T* w = params_.data() + t.offset;
    if (t.role == TensorRole::kLora) continue;  // init_lora below
    if (t.role == TensorRole::kNorm || t.role == TensorRole::kBias) {
      const T value = t.role == TensorRole::kNorm ? T(1) : T(0);
      std::fill(w, w + t.numel, value);
      continue;
    }
    const bool residual_output = t.name.find("o_proj.weight") != std::string::npos ||
                                 t.name.find("down_proj.weight") != std::string::npos;
    const double stddev = 0.02 * (residual_output ? residual_scale : 1.0);
    // Box-Muller on Philox uniforms: one stream per tensor, so a tensor's values do not depend on
    // which other tensors exist, and each value on nothing but its index (any thread count, same bits).
    const uint64_t stream = layer::weight_init_stream(ti);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < t.numel; ++i) {
      const double u1 = 1.0 - philox_uniform(seed, stream, 2 * static_cast<uint64_t>(i));
      const double u2 = philox_uniform(seed, stream, 2 * static_cast<uint64_t>(i) + 1);
      const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
      w[i] = static_cast<T>(stddev * z);
    }
  }
  init_lora();
}

template <typename T>
uint64_t Model<T>::dropout_stream(int layer, int site) const {
  return (dropout_counter_ * static_cast<uint64_t>(config_.n_layers) + static_cast<uint64_t>(layer)) *
             kDropoutSites +
         static_cast<uint64_t>(site);
}

template <typename T>
void Model<T>::norm_forward(const std::string& prefix, T* out, T* mean, T* rstd, const T* x, int rows,
                            int width) {
  const T* w = param(prefix + ".weight");
  if (config_.norm_type == "layernorm") {
    ref::layernorm_forward(out, mean, rstd, x, w, param(prefix + ".bias"), rows, width, config_.norm_eps);
  } else {
    ref::rmsnorm_forward(out, rstd, x, w, rows, width, config_.norm_eps);
  }
}

template <typename T>
void Model<T>::norm_backward(const std::string& prefix, T* dx, const T* dout, const T* x, const T* mean,
                             const T* rstd, int rows, int width) {
  const T* w = param(prefix + ".weight");
  T* dw = grad(prefix + ".weight");
  if (config_.norm_type == "layernorm") {
    ref::layernorm_backward(dx, dw, grad(prefix + ".bias"), dout, x, mean, rstd, w, rows, width);
  } else {
    ref::rmsnorm_backward(dx, dw, dout, x, rstd, w, rows, width);
  }
}

template <typename T>
void Model<T>::linear_forward(const std::string& prefix, T* out, const T* x, int in_features,
                              int out_features, bool bias) {
  ref::linear_forward(out, x, param(prefix + ".weight"), bias ? param(prefix + ".bias") : nullptr, B_ * T_,
                      in_features, out_features);
}

template <typename T>
void Model<T>::linear_backward(const std::string& prefix, T* dx, const T* dout, const T* x, int in_features,
                               int out_features, bool bias, bool accumulate_dx) {
  ref::linear_backward(dx, grad(prefix + ".weight"), bias ? grad(prefix + ".bias") : nullptr, dout, x,
                       param(prefix + ".weight"), B_ * T_, in_features, out_features, accumulate_dx);
}

template <typename T>
void Model<T>::layer_linear_forward(int l, int tensor, T* out, const T* x, int in_features, int out_features,
                                    bool bias) {
  const LoraModule* m = lora_at(l, tensor);
  if (!m) {
    linear_forward(name(l, tensor), out, x, in_features, out_features, bias);
    return;
  }
  const std::string& prefix = name(l, tensor);
  const float p = training_ ? static_cast<float>(options_.lora.dropout) : 0.0f;
  ref::lora_forward(out, lora_hidden(l, tensor), x, param(prefix + ".weight"),
                    bias ? param(prefix + ".bias") : nullptr, param(m->a_name()), param(m->b_name()), B_ * T_,
                    in_features, out_features, options_.lora.r, options_.lora.scale(), p, dropout_seed_,
                    lora_dropout_stream(dropout_counter_, config_.n_layers, l, tensor));
}

template <typename T>
void Model<T>::layer_linear_backward(int l, int tensor, T* dx, const T* dout, const T* x, int in_features,
                                     int out_features, bool bias, bool accumulate_dx) {
  const LoraModule* m = lora_at(l, tensor);
  const std::string& prefix = name(l, tensor);
  if (!m) {
    linear_backward(prefix, dx, dout, x, in_features, out_features, bias, accumulate_dx);
    return;
  }
  const float p = training_ ? static_cast<float>(options_.lora.dropout) : 0.0f;
  ref::lora_backward(dx, grad(m->a_name()), grad(m->b_name()), dout, x, lora_hidden(l, tensor),
                     param(prefix + ".weight"), param(m->a_name()), param(m->b_name()), B_ * T_, in_features,
                     out_features, options_.lora.r, options_.lora.scale(), p, dropout_seed_,
                     lora_dropout_stream(dropout_counter_, config_.n_layers, l, tensor), accumulate_dx);
  // A trainable base weight or bias beside an adapter (not the usual LoRA set-up, but allowed).
  T* dw = grad(prefix + ".weight");
  T* db = bias ? grad(prefix + ".bias") : nullptr;
  if (dw || db) {
    ref::linear_backward(static_cast<T*>(nullptr), dw, db, dout, x, param(prefix + ".weight"), B_ * T_,
                         in_features, out_features);
  }
}

template <typename T>
double Model<T>::forward(const int32_t* inputs, const int32_t* targets, int B, int T_len,
                         const int32_t* positions, const int32_t* doc_ids) {
  if (B <= 0 || T_len <= 0 || B > options_.max_batch || T_len > options_.max_seq) {
    throw std::invalid_argument("batch " + std::to_string(B) + "x" + std::to_string(T_len) +
                                " is outside the planned maximum " + std::to_string(options_.max_batch) +
                                "x" + std::to_string(options_.max_seq));
  }
  B_ = B;
  T_ = T_len;
  const int N = B * T_len, C = config_.d_model, V = config_.vocab_size;
  // Keep our own copy of the batch: the backward pass needs it after the caller's buffers move on.
  inputs_copy_.assign(inputs, inputs + N);
  for (int n = 0; n < N; ++n) {
    if (inputs_copy_[n] < 0 || inputs_copy_[n] >= V) {
      throw std::invalid_argument("input token " + std::to_string(inputs_copy_[n]) + " at position " +
                                  std::to_string(n) + " is outside the vocabulary [0, " + std::to_string(V) +
                                  ")");
    }
  }
  inputs_ = inputs_copy_.data();
  targets_ = nullptr;
  if (targets) {
    targets_copy_.assign(targets, targets + N);
    for (int n = 0; n < N; ++n) {
      const int32_t t = targets_copy_[n];
      if (t != -100 && (t < 0 || t >= V)) {
        throw std::invalid_argument("target token " + std::to_string(t) + " at position " +
                                    std::to_string(n) +
                                    " is outside the vocabulary and is not the ignore index -100");
      }
    }
    targets_ = targets_copy_.data();
  }
  if (positions) {
    positions_copy_.assign(positions, positions + N);
    for (int n = 0; n < N; ++n) {
      if (positions_copy_[n] < 0 || positions_copy_[n] >= config_.max_seq_len) {
        throw std::invalid_argument("position " + std::to_string(positions_copy_[n]) +
                                    " is outside [0, max_seq_len)");
      }
    }
  } else {
    positions_copy_.resize(N);
    for (int n = 0; n < N; ++n) positions_copy_[n] = n % T_len;
  }
  positions_ = positions_copy_.data();
  doc_ids_ = nullptr;
  if (doc_ids) {
    doc_ids_copy_.assign(doc_ids, doc_ids + N);
    doc_ids_ = doc_ids_copy_.data();
  }

  T* x0 = residual(0);
  ref::embedding_forward(x0, inputs_, param("model.embed_tokens.weight"), N, C);
  if (training_ && options_.neftune_alpha > 0.0) {
    ref::embedding_noise_forward(x0, static_cast<size_t>(N) * C,
                                 layer::neftune_scale(options_.neftune_alpha, T_len, C), dropout_seed_,
                                 layer::neftune_stream(dropout_counter_));
  }
  if (config_.positional_encoding == "learned") {
    ref::add_position_embedding_forward(x0, param("model.embed_positions.weight"), positions_, N, C);
  } else if (config_.positional_encoding == "sinusoidal") {
    ref::add_position_embedding_forward(x0, sinusoidal_.data(), positions_, N, C);
  }
  for (int l = 0; l < config_.n_layers; ++l) {
    layer_forward(l, residual(l), residual(l + 1), layers_[options_.recompute ? 0 : l]);
  }
  norm_forward("model.norm", global_.final_norm_out, global_.final_mean, global_.final_rstd,
               residual(config_.n_layers), N, C);
  const std::string head = config_.tie_word_embeddings ? "model.embed_tokens" : "lm_head";
  linear_forward(head, global_.logits, global_.final_norm_out, C, V, false);

  target_count_ = 0;
  if (!targets_) return 0.0;
  ref::token_logprobs_forward(global_.logprobs, global_.lse, global_.logits, targets_, N, V);
  return ref::cross_entropy_mean(global_.logprobs, targets_, N, &target_count_);
}

template <typename T>
void Model<T>::layer_forward(int l, const T* x, T* out, LayerBuffers& b) {
  const ModelConfig& c = config_;
  const int N = B_ * T_, C = c.d_model, D = c.resolved_head_dim(), F = c.d_ff;
  const int Q = c.n_heads * D, K = c.n_kv_heads * D;
  const float p = training_ ? static_cast<float>(c.dropout) : 0.0f;

  norm_forward(name(l, kNorm1), b.norm1_out, b.norm1_mean, b.norm1_rstd, x, N, C);
  layer_linear_forward(l, kQ, b.q, b.norm1_out, C, Q, c.attention_bias);
  layer_linear_forward(l, kK, b.k, b.norm1_out, C, K, c.attention_bias);
  layer_linear_forward(l, kV, b.v, b.norm1_out, C, K, c.attention_bias);
  const T* q = b.q;
  const T* k = b.k;
  if (c.qk_norm) {
    ref::rmsnorm_forward(b.q_normed, b.q_rstd, q, param(name(l, kQNorm) + ".weight"), N * c.n_heads, D,
                         c.norm_eps);
    ref::rmsnorm_forward(b.k_normed, b.k_rstd, k, param(name(l, kKNorm) + ".weight"), N * c.n_kv_heads, D,
                         c.norm_eps);
    q = b.q_normed;
    k = b.k_normed;
  }
  if (c.uses_rope()) {
    ref::rope_forward(b.q_rot, q, rope_cos_.data(), rope_sin_.data(), positions_, N, c.n_heads, D);
    ref::rope_forward(b.k_rot, k, rope_cos_.data(), rope_sin_.data(), positions_, N, c.n_kv_heads, D);
    q = b.q_rot;
    k = b.k_rot;
  }
  ref::AttentionShape shape{B_, T_, c.n_heads, c.n_kv_heads, D};
  ref::AttentionOptions opt;
  opt.sliding_window = c.sliding_window;
  opt.doc_ids = doc_ids_;
  opt.alibi_slopes = alibi_.empty() ? nullptr : alibi_.data();
  opt.dropout = p;
  opt.seed = dropout_seed_;
  opt.stream = dropout_stream(l, kAttentionProbs);
  ref::attention_forward(b.attn_out, b.probs, q, k, b.v, shape, opt);

  T* branch = global_.branch;
  layer_linear_forward(l, kO, branch, b.attn_out, Q, C, false);
  if (p > 0)
    ref::dropout_forward(branch, branch, static_cast<size_t>(N) * C, p, dropout_seed_,
                         dropout_stream(l, kAttentionOutput));
  ref::residual_add(b.mid, x, branch, static_cast<size_t>(N) * C);

  norm_forward(name(l, kNorm2), b.norm2_out, b.norm2_mean, b.norm2_rstd, b.mid, N, C);
  const size_t NF = static_cast<size_t>(N) * F;
  layer_linear_forward(l, kUp, b.up, b.norm2_out, C, F, false);
  if (c.gated_mlp()) {
    layer_linear_forward(l, kGate, b.gate, b.norm2_out, C, F, false);
    ref::swiglu_forward(b.act, b.gate, b.up, NF);
  } else {
    ref::activation_forward(activation_kind(c), b.act, b.up, NF, c.leaky_relu_slope);
  }
  layer_linear_forward(l, kDown, branch, b.act, F, C, false);
  if (p > 0)
    ref::dropout_forward(branch, branch, static_cast<size_t>(N) * C, p, dropout_seed_,
                         dropout_stream(l, kMlpOutput));
  ref::residual_add(out, b.mid, branch, static_cast<size_t>(N) * C);
}

template <typename T>
void Model<T>::backward_mean_cross_entropy(double scale) {
  const int N = B_ * T_;
  ref::cross_entropy_mean_grad(global_.d_logprobs, targets_, N, target_count_);
  for (int n = 0; n < N; ++n) global_.d_logprobs[n] = static_cast<T>(global_.d_logprobs[n] * scale);
  backward(global_.d_logprobs);
}

template <typename T>
void Model<T>::backward(const T* dlogprobs) {
  if (!targets_) throw std::logic_error("backward needs a forward pass with targets");
  const int N = B_ * T_, C = config_.d_model, V = config_.vocab_size;
  auto& g = global_;
  ref::token_logprobs_backward(g.d_logits, dlogprobs, g.logits, g.lse, targets_, N, V);
  const std::string head = config_.tie_word_embeddings ? "model.embed_tokens" : "lm_head";
  linear_backward(head, g.d_norm_out, g.d_logits, g.final_norm_out, C, V, false, false);
  std::fill(g.d_residual, g.d_residual + static_cast<size_t>(N) * C, T(0));
  norm_backward("model.norm", g.d_residual, g.d_norm_out, residual(config_.n_layers), g.final_mean,
                g.final_rstd, N, C);
  for (int l = config_.n_layers - 1; l >= 0; --l) {
    LayerBuffers& b = layers_[options_.recompute ? 0 : l];
    // Recompute refills the shared buffers; it rewrites residual(l + 1) with the same values.
    if (options_.recompute) layer_forward(l, residual(l), residual(l + 1), b);
    layer_backward(l, residual(l), b);
  }
  if (T* d_embed = grad("model.embed_tokens.weight"))
    ref::embedding_backward(d_embed, g.d_residual, inputs_, N, C);
  if (config_.positional_encoding == "learned") {
    if (T* d_pos = grad("model.embed_positions.weight")) {
      ref::add_position_embedding_backward(d_pos, g.d_residual, positions_, N, C);
    }
  }
}

template <typename T>
void Model<T>::layer_backward(int l, const T* x, LayerBuffers& b) {
  const ModelConfig& c = config_;
  const int N = B_ * T_, C = c.d_model, D = c.resolved_head_dim(), F = c.d_ff;
  const int Q = c.n_heads * D, K = c.n_kv_heads * D;
  const size_t NC = static_cast<size_t>(N) * C, NF = static_cast<size_t>(N) * F;
  const float p = training_ ? static_cast<float>(c.dropout) : 0.0f;
  auto& g = global_;
  T* d_res = g.d_residual;  // dL/d(layer output) on entry, dL/dx on exit

  // MLP branch: out = mid + dropout(act Wd).
  const T* d_branch = d_res;
  if (p > 0) {
    ref::dropout_backward(g.d_branch, d_res, NC, p, dropout_seed_, dropout_stream(l, kMlpOutput));
    d_branch = g.d_branch;
  }
  layer_linear_backward(l, kDown, g.d_act, d_branch, b.act, F, C, false, false);
  if (c.gated_mlp()) {
    ref::swiglu_backward(g.d_gate, g.d_up, g.d_act, b.gate, b.up, NF);
    layer_linear_backward(l, kGate, g.d_norm_out, g.d_gate, b.norm2_out, C, F, false, false);
    layer_linear_backward(l, kUp, g.d_norm_out, g.d_up, b.norm2_out, C, F, false, true);
  } else {
    ref::activation_backward(activation_kind(c), g.d_up, g.d_act, b.up, NF, c.leaky_relu_slope);
    layer_linear_backward(l, kUp, g.d_norm_out, g.d_up, b.norm2_out, C, F, false, false);
  }
  norm_backward(name(l, kNorm2), d_res, g.d_norm_out, b.mid, b.norm2_mean, b.norm2_rstd, N, C);

  // Attention branch: mid = x + dropout(attn_out Wo).
  d_branch = d_res;
  if (p > 0) {
    ref::dropout_backward(g.d_branch, d_res, NC, p, dropout_seed_, dropout_stream(l, kAttentionOutput));
    d_branch = g.d_branch;
  }
  layer_linear_backward(l, kO, g.d_attn_out, d_branch, b.attn_out, Q, C, false, false);
  const T* q = c.uses_rope() ? b.q_rot : (c.qk_norm ? b.q_normed : b.q);
  const T* k = c.uses_rope() ? b.k_rot : (c.qk_norm ? b.k_normed : b.k);
  ref::AttentionShape shape{B_, T_, c.n_heads, c.n_kv_heads, D};
  ref::AttentionOptions opt;
  opt.sliding_window = c.sliding_window;
  opt.doc_ids = doc_ids_;
  opt.alibi_slopes = alibi_.empty() ? nullptr : alibi_.data();
  opt.dropout = p;
  opt.seed = dropout_seed_;
  opt.stream = dropout_stream(l, kAttentionProbs);
  ref::attention_backward(g.d_q, g.d_k, g.d_v, g.d_attn_out, b.probs, q, k, b.v, shape, opt);
  if (c.uses_rope()) {
    ref::rope_backward(g.d_q, g.d_q, rope_cos_.data(), rope_sin_.data(), positions_, N, c.n_heads, D);
    ref::rope_backward(g.d_k, g.d_k, rope_cos_.data(), rope_sin_.data(), positions_, N, c.n_kv_heads, D);
  }
  const T* d_q = g.d_q;
  const T* d_k = g.d_k;
  if (c.qk_norm) {
    // The norm backward accumulates into its input gradient, so start from zero.
    std::fill(g.d_q_pre, g.d_q_pre + static_cast<size_t>(N) * Q, T(0));
    std::fill(g.d_k_pre, g.d_k_pre + static_cast<size_t>(N) * K, T(0));
    ref::rmsnorm_backward(g.d_q_pre, grad(name(l, kQNorm) + ".weight"), g.d_q, b.q, b.q_rstd,
                          param(name(l, kQNorm) + ".weight"), N * c.n_heads, D);
    ref::rmsnorm_backward(g.d_k_pre, grad(name(l, kKNorm) + ".weight"), g.d_k, b.k, b.k_rstd,
                          param(name(l, kKNorm) + ".weight"), N * c.n_kv_heads, D);
    d_q = g.d_q_pre;
    d_k = g.d_k_pre;
  }
  layer_linear_backward(l, kQ, g.d_norm_out, d_q, b.norm1_out, C, Q, c.attention_bias, false);
  layer_linear_backward(l, kK, g.d_norm_out, d_k, b.norm1_out, C, K, c.attention_bias, true);
  layer_linear_backward(l, kV, g.d_norm_out, g.d_v, b.norm1_out, C, K, c.attention_bias, true);
  norm_backward(name(l, kNorm1), d_res, g.d_norm_out, x, b.norm1_mean, b.norm1_rstd, N, C);
}

template <typename T>
MemoryPlan Model<T>::memory_plan(double optimizer_bytes_per_param) const {
  MemoryPlan plan =
      plan_memory(config_, options_.max_batch, options_.max_seq, options_.recompute, layout_.total_elements(),
                  layout_.trainable_elements(), sizeof(T), optimizer_bytes_per_param);
  plan.activations += lora_arena_.size() * sizeof(T);
  if (options_.quant.nf4) {
    // Per base tensor of n values: n/2 code bytes, and per block of 64 an fp32 absmax, or with double
    // quantisation an 8-bit code plus an fp32 scale per 256 blocks and one fp32 offset.
    for (const std::string& name : nf4_quantized_tensors(config_)) {
      const size_t n = static_cast<size_t>(layout_.at(name).numel);
      const size_t blocks = ref::blocks_for(n, options_.quant.blocksize);
      plan.nf4_params += n;
      plan.nf4_base += (n + 1) / 2;
      plan.nf4_base += options_.quant.double_quant
                           ? blocks + 4 * ref::blocks_for(blocks, ref::kNf4NestedBlockSize) + 4
                           : 4 * blocks;
    }
  }
  return plan;
}

template class Model<float>;
template class Model<double>;

}  // namespace llm
