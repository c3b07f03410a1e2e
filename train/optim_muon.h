// Muon: MomentUm Orthogonalized by Newton-Schulz (Keller Jordan et al. 2024,
// kellerjordan.github.io/posts/muon, reference code github.com/KellerJordan/Muon).
//
// Muon updates each 2-D hidden matrix W (role kMatrix, rows x cols) with an orthogonalised momentum:
//
//   B = mu B + (1 - mu) G                       momentum as an EMA (B starts at zero)
//   D = nesterov ? (1 - mu) G + mu B : B        Nesterov look-ahead, or the plain momentum
//   O = NS5(D)                                  approximately U V^T where D = U S V^T
//   W = W - lr (sqrt(max(1, rows / cols)) O + wd W)     decoupled weight decay, as AdamW's
//
// The reference keeps B as an EMA (torch lerp); the older form B = mu B + G, D = G + mu B gives
// exactly 1 / (1 - mu) times the same D, and NS5 normalises D first, so the two differ only through
// the 1e-7 in that normalisation.
//
// NS5 is the quintic Newton-Schulz iteration on X = D / (||D||_F + 1e-7), transposed first when
// rows > cols so that X is wide and A below is the small Gram matrix:
//
//   repeat muon_ns_steps times:  A = X X^T;  B = b A + (c A) A;  X = a X + B X
//   with (a, b, c) = (3.4445, -4.7750, 2.0315)
//
// Each step maps every singular value s of X to a s + b s^3 + c s^5. The coefficients maximise the
// slope at zero rather than converge exactly, so after 5 steps the singular values lie in a band
// around 1 (roughly 0.7 to 1.2) instead of at 1; the reference reports this does not hurt training.
//
// Everything that is not a 2-D hidden matrix (embeddings, the head, norms, biases) goes to an
// internal AdamW (adamw_beta1, adamw_beta2, adamw_eps, each tensor's own weight decay) running at
// muon_adamw_lr_scale x lr.
//
// Precision (muon_ns_precision, CPU only): the reference and the GPU run NS5 in bf16. The CPU stores
// B in fp32, forms D in double from it and runs NS5 in double by default ("fp64"); O is then rounded
// to fp32 and W updated in double, rounded once. fp32 is not the default because NS5 amplifies
// rounding (up to a^5 = 3.4445^5, about 480x, along small singular directions): fp32 NS5 from two
// correct programs (PyTorch's and ours, summing in different orders) differ by about 1e-6 of the
// largest entry, more than a 1e-6 relative check on the parameters allows after lr scaling. So the
// PyTorch fixture runs the Muon cases in float64 too, and the CPU matches it at 1e-6; the
// orthogonaliser alone is also checked against PyTorch in float32 and bfloat16. "fp32" stores every
// intermediate matrix as fp32 (products summed in double); "bf16" rounds the input and every
// intermediate to bf16 (nearest, ties to even), mirroring how torch computes on bf16 tensors, so the
// GPU path has a CPU twin.
//
// Defaults (LLM-Lab): muon_momentum 0.95, muon_nesterov true, muon_ns_steps 5, muon_adamw_lr_scale
// 0.1; here also muon_ns_precision "fp64". State: B (4 bytes per Muon parameter); m and v (8 bytes)
// for the rest.
#pragma once

#include "train/optimizer.h"

namespace llm {

// Rounds to the nearest bf16 value (ties to even) and back to float; NaN stays NaN.
float round_to_bf16(float x);

enum class NsPrecision { kFloat64, kFloat32, kBf16 };
// "fp64", "fp32", "bf16" to the enum; throws ConfigError for anything else.
NsPrecision ns_precision_from_name(const std::string& name);

// NS5 of the row-major rows x cols matrix `g` into `out` (same shape), with `steps` iterations at
// the given precision (the input is first rounded to that precision).
void newton_schulz5(float* out, const float* g, int64_t rows, int64_t cols, int steps, NsPrecision precision);
void newton_schulz5(float* out, const double* g, int64_t rows, int64_t cols, int steps,
                    NsPrecision precision);

// Whether Muon (rather than its internal AdamW) updates this tensor: a 2-D hidden matrix.
bool muon_updates(const TensorInfo& info);

class Muon : public Optimizer {
 public:
  Muon(double momentum, bool nesterov, int ns_steps, NsPrecision ns_precision, double adamw_lr_scale,
       double adamw_beta1, double adamw_beta2, double adamw_eps);
  std::string name() const override { return "muon"; }
  // Exact after init (4 bytes per Muon parameter, 8 per AdamW parameter); 8 before.
  double state_bytes_per_param() const override;
  void init(const std::vector<ParamView>& params) override;
  void step(const std::vector<ParamView>& params, double lr, int64_t step) override;
  std::vector<StateBuffer> state() const override;
  void load_state(const std::vector<StateBuffer>& state) override;

 private:
  double momentum_;
  bool nesterov_;
  int ns_steps_;
  NsPrecision ns_precision_;
  double adamw_lr_scale_;
  AdamW adamw_;
  std::vector<size_t> muon_index_, adamw_index_;  // positions in the views given to init
  std::vector<std::vector<float>> buffer_;        // one per Muon tensor
  std::vector<std::string> muon_names_, adamw_names_;
  std::vector<size_t> adamw_sizes_;
};

}  // namespace llm
