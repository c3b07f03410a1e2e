// The transformer on the GPU: the same forward and backward as llm/model.cpp (same layer order, same
// Philox dropout streams, positions and document ids, qk_norm, RoPE, ALiBi, sliding window, tied head),
// written with the CUDA kernels of kernels/*.cuh. This header is plain C++ (no CUDA types), so that code
// in train/ can include it; everything CUDA lives in kernels/cuda_model.cu.
//
// Storage. Every dense parameter has a working copy in the storage type on the device (bf16 in
// training). A trainable parameter also has an fp32 master copy on the device (what the optimizers
// update and download_parameters returns). A frozen one (trainable == false: the base under LoRA) has
// no fp32 copy on the device in bf16 mode: download_parameters returns its exact uploaded values (so
// checkpoints stay bit for bit the CPU backend's), read back from its bf16 working copy when bf16 holds
// them exactly, else from an fp32 copy kept in host memory (see "Host memory" below); the working copy is
// written by upload_parameters only. Device bytes per dense parameter in bf16 mode: 6 trainable
// (4 master + 2 working), 2 frozen; memory_plan().parameters counts exactly these. In the fp32 test mode
// the working copy IS the master copy, for frozen tensors too (4 bytes each, nothing on the host). The
// trainable tensors come first in both device arenas (layout order, so that a trainable tensor's device
// offset is its grad_offset), then the frozen dense tensors (working arena only in bf16 mode). Which
// tensors train is fixed at construction (layout() is const; nothing here calls set_trainable).
//
// Gradients are fp32 and accumulate (+=). Activations live in one device arena planned from the
// config, the batch and the sequence length before any work (the same per-layer sizes as
// llm/memory_plan.h, except that the flash path saves the per-row log-sum-exp instead of the
// probabilities). The LM head and the cross-entropy run in the fused, chunked classifier, so the full
// [N, V] logits never exist.
//
// Attention path: the flash kernels when head_dim is 64 or 128, else the simple kernels (which save
// the fp32 probabilities, as the CPU reference does).
//
// LoRA (options.lora.enabled). The layout is built exactly as llm::Model builds it: ParameterLayout(config),
// then add_lora_tensors(layout, lora_modules(config, lora), lora.r), which appends every adapter's
// P.lora_A.weight [r, in] and P.lora_B.weight [out, r] after the base tensors and freezes the base. So host
// parameter vectors (upload/download, checkpoints) are interchangeable with the CPU backend's. An adapted
// linear layer runs the frozen base (matmul_forward, or the NF4 layer below) and then cuda::lora_forward,
// which adds s h B^T (kernels/lora.cuh); backward runs the base's input gradient only (no dW, no db: frozen)
// and then cuda::lora_backward, which adds the adapter's part of dx and accumulates dA and dB into the fp32
// gradient arena. Each adapter's h = dropout(x) A^T ([N, r]) is saved in the activation arena for every
// layer (also with recompute, where re-running the layer rewrites the same values); the dropped input x~
// is never saved: lora_backward draws the same Philox mask again (stream
// layer::lora_dropout_stream(counter, n_layers, layer, tensor), training mode only, as the CPU model).
//
// QLoRA (options.quant.nf4, needs LoRA). Every tensor of nf4_quantized_tensors(config) (the decoder
// layers' linear weights) exists on the device only in NF4: packed codes (n/2 bytes) and, with double
// quantisation, the 8-bit absmax codes plus one fp32 scale per 256 blocks (bitsandbytes' layout; about
// 0.516 bytes per weight), else the fp32 absmax (0.5625). Those weights have no fp32 master, no bf16
// working copy and no host copy beyond their codes: the arenas hold the other tensors only, at "device
// offsets" (equal to the layout offsets only when nothing is frozen or quantised). A quantised layer
// dequantises its absmax (double quantisation: nf4_double_dequantize, each call; a few KB) and then its
// weight into one scratch buffer of T sized for the largest quantised matrix, shared by all layers, and
// runs the cuBLASLt GEMM (nf4_linear_forward / nf4_linear_backward_input, kernels/nf4.cuh).
// The quantisation itself is the CPU reference's, on the host (see quantize_base_nf4), so the codes and the
// dequantised values are bit for bit those of llm::Model::quantize_base_nf4.
//
// Host memory. A frozen dense tensor in bf16 mode keeps an fp32 host copy only when bf16 cannot hold its
// values exactly (one value with more mantissa bits, a NaN or a subnormal: an fp32 or fp16 base, not a
// bf16 one, whose working copy is read back instead). With options.quantize_on_upload, an NF4 tensor is
// quantised as it is uploaded and only its codes stay on the host (about 0.56 bytes per weight, for
// download_parameters), so a base streamed tensor by tensor never has its fp32 values on the host all at
// once. Uploading an NF4 tensor's current (dequantised) values again keeps its codes, so a read and a
// write back change nothing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "llm/config.h"
#include "llm/lora.h"
#include "llm/memory_plan.h"
#include "llm/params.h"

namespace llm::cuda {

enum class Precision { kFp32, kBf16 };

// One weight in NF4 as the host reference computes it (llm::nf4_quantize_weights).
using Nf4HostWeights = Nf4Weights;
// Quantises n host weights with the given settings (blocksize, double quantisation).
using Nf4HostQuantizer = std::function<Nf4HostWeights(const float* w, size_t n, const QuantSettings& quant)>;
// "fp32" | "bf16"; throws std::invalid_argument for anything else.
Precision parse_precision(const std::string& name);
const char* precision_name(Precision precision);

struct CudaModelOptions {
  int max_batch = 1;       // the largest batch the arena is planned for
  int max_seq = 0;         // the longest sequence (0 means config.max_seq_len)
  bool recompute = false;  // keep only each layer's input; re-run the layer's forward in backward
  Precision precision = Precision::kBf16;
  int classifier_chunk_rows = 0;  // 0: chosen from the vocabulary size (about 64 MB of logits per chunk)
  LoraSettings lora;              // adapters on a frozen base (llm/lora.h), as llm::ModelOptions::lora
  QuantSettings quant;  // QLoRA: the base's decoder-layer linear weights in NF4 (needs lora.enabled)
  // QLoRA: when set, each NF4 tensor is quantised with it as soon as it is uploaded, and its fp32 values
  // are not kept; download_parameters then returns the dequantised values of a written NF4 tensor even
  // before quantize_base_nf4. Unset, the values wait on the host until quantize_base_nf4 and download
  // returns them as written (as llm::Model does). For a base written once, tensor by tensor.
  Nf4HostQuantizer quantize_on_upload;
  double neftune_alpha = 0.0;  // NEFTune noise on the embeddings in training, as llm::ModelOptions
};

// AdamW hyperparameters, and per trainable tensor (layout order) its weight decay and lr multiplier.
struct CudaAdamW {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  std::vector<double> weight_decay, lr_scale;
};

class CudaModel {
 public:
  CudaModel(const ModelConfig& config, const CudaModelOptions& options);
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const ModelConfig& config() const;
  const CudaModelOptions& options() const;
  const ParameterLayout& layout() const;
  // Bytes per kind on the device (optimizer state included once adamw_init has run).
  MemoryPlan memory_plan() const;

  // Host float vectors in ParameterLayout order (total_elements()). Upload sets the master (on the device;
  // a frozen tensor in bf16 mode has none: see Storage) and the working copy; download returns the
  // uploaded values.
  // QLoRA: before quantize_base_nf4 the values of the quantised tensors wait on the host (forward refuses
  // to run), or with options.quantize_on_upload their codes do; afterwards download returns their
  // dequantised values (bit for bit the CPU model's), and upload
  // keeps the NF4 codes: it only accepts, for those tensors, exactly the current dequantised values (a
  // resumed checkpoint holds them) and throws std::invalid_argument for anything else, since quantising
  // dequantised NF4 values again is not guaranteed to give the same codes. Everything else is uploaded.
  void upload_parameters(const std::vector<float>& values);
  std::vector<float> download_parameters() const;
  // The trainable tensors only, each at its grad_offset (layout().trainable_elements() values): what a
  // LoRA checkpoint holds, without a host copy of the frozen base. Upload refreshes the working copy.
  void upload_trainable_parameters(const std::vector<float>& values);
  std::vector<float> download_trainable_parameters() const;
  // The leading values.size() elements of the layout (a base model's tensors, which precede the LoRA
  // adapters), as upload_parameters would set them; the rest is left as it is. Throws
  // std::invalid_argument when the count ends inside a tensor.
  void upload_base_parameters(const std::vector<float>& values);
  // One tensor (layout().at(name).numel values), as upload_parameters would set it.
  void upload_tensor(const std::string& name, const std::vector<float>& values);
  // QLoRA: quantises the current values of every tensor of nf4_quantized_tensors(config) with `quantize`
  // (the CPU reference on the host: llm::nf4_quantize_weights, in llm_core, which this library does not
  // link) and uploads the codes and absmax. A tensor that options.quantize_on_upload quantised already
  // keeps its codes (the same quantiser is expected); one never uploaded is quantised as zeros.
  // Called again, it quantises the dequantised values again, as llm::Model::quantize_base_nf4 does.
  // Throws std::logic_error unless the model was built with quant.nf4.
  void quantize_base_nf4(const Nf4HostQuantizer& quantize);
  bool nf4_quantized() const;
  // Bytes of parameter values the model keeps on the host: fp32 copies of frozen tensors that bf16 cannot
  // hold (bf16 mode), NF4 values waiting for quantize_base_nf4, and the NF4 codes and absmax.
  size_t host_parameter_bytes() const;
  // The fp32 gradient arena (trainable_elements(), grad_offset order).
  std::vector<float> download_gradients() const;
  // Overwrites the gradient arena (same order and length), e.g. for tests that hand both backends the
  // same gradients.
  void upload_gradients(const std::vector<float>& values);

  void set_dropout_rng(uint64_t seed, uint64_t counter);
  void set_training(bool training);

  // Forward on B x T host tokens (as llm::Model::forward). With targets it returns the mean cross-entropy
  // over the non-ignored tokens; without, it returns 0. positions / doc_ids (B*T) may be null.
  double forward(const int32_t* inputs, const int32_t* targets, int B, int T,
                 const int32_t* positions = nullptr, const int32_t* doc_ids = nullptr);
  // Backward of the last forward's mean cross-entropy times `scale`; gradients accumulate.
  // (It re-runs the LM head: use forward_backward when both are wanted.)
  void backward_mean_cross_entropy(double scale = 1.0);
  // forward + backward_mean_cross_entropy with one pass of the fused classifier. Returns the loss.
  double forward_backward(const int32_t* inputs, const int32_t* targets, int B, int T,
                          const int32_t* positions, const int32_t* doc_ids, double scale);
  int target_count() const;

  void zero_grad();
  // Global L2 norm of the gradients (NaN/Inf when one is not finite).
  double grad_norm();
  void scale_grads(double factor);

  // AdamW with fp32 state (m, v) on the device. adamw_init allocates zeroed state; step counts from 1.
  void adamw_init(const CudaAdamW& hyper);
  void adamw_step(double lr, int64_t step);
  // m (which = 0) or v (which = 1) of trainable tensor `tensor` (index among the trainable tensors).
  std::vector<float> download_adamw_state(int which, size_t tensor) const;
  void upload_adamw_state(int which, size_t tensor, const std::vector<float>& values);

  // Logits of the last position of one sequence (dropout off; the last max_seq tokens are used).
  std::vector<float> next_token_logits(const std::vector<int32_t>& tokens);

  // One label per position drawn from the model's own next-token distribution (Sophia's
  // Gauss-Newton-Bartlett estimate): a forward pass with dropout off on B x T host tokens, then, for
  // position n, the token llm::sample_token(logits_n, 1.0, 0, seed, counter_base + n) picks on the host
  // (llm/sampling.h): fp64 weights exp(l - max), u = philox_uniform(seed, counter_base + n, 0) * sum,
  // the first token whose running sum exceeds u. The logits are the working precision's (bf16 in
  // training); the running sums are added in another order than the host loop's, which can change a
  // label only when u lies within about 1e-16 (relative) of a boundary. Returns the B*T labels (host).
  std::vector<int32_t> sample_labels(const int32_t* inputs, int B, int T, const int32_t* positions,
                                     const int32_t* doc_ids, uint64_t seed, uint64_t counter_base);

  // Waits for the device.
  void synchronize() const;

  // For optimizers that run outside this class (kernels/cuda_optimizers.h): device pointers to the fp32
  // master weights of the trainable tensors (at device_offset(name), which equals the tensor's
  // grad_offset) and fp32 gradients (grad offsets), the cudaStream_t all work runs on, and the refresh of
  // the working copy after the master weights were changed directly (trainable tensors only: frozen ones
  // never change after upload).
  float* device_master();
  // Element offset of trainable tensor `name` in device_master(); throws std::invalid_argument for a
  // frozen tensor (NF4 or dense), which has no place in the optimizers' view of the master weights.
  size_t device_offset(const std::string& name) const;
  float* device_gradients();
  void* cuda_stream();
  void refresh_working_copy();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace llm::cuda
