// 8-bit AdamW: AdamW whose moments m and v are stored blockwise-quantised in one byte each
// (after Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"; the code below is this
// project's own, simpler than bitsandbytes' dynamic tree map).
//
// Each tensor's m and v are cut into blocks of adamw_8bit_block_size elements (default 256; the last
// block may be shorter). A block stores one fp32 absmax a = max |x| and one byte per element, the index
// of the code value nearest to x / a:
//
//   v (unsigned code, 256 values):  0, and 2^(-j/8) for j = 254 .. 0   (codes 1 .. 255)
//   m (signed code, 255 values):    -2^(-j/8) for j = 0 .. 126, 0, +2^(-j/8) for j = 126 .. 0
//                                    (codes 0 .. 254 ascending; code 255 is never written and reads
//                                     as +1)
//
// so values are kept to a relative precision of 2^(1/16) - 1 = 4.4% (half a step of 2^(1/8)) over a
// range of 2^-31.75 (v) and 2^-15.75 (m) below the block's absmax; smaller values round to 0.
// "Nearest" is decided against the midpoints of neighbouring code values (ties to the lower code),
// with the normalised value x / a computed as one fp32 division, so a GPU twin reproduces it exactly.
//
// One step, per element, with gradient g and step t:
//
//   m, v = dequantise(codes, absmax)
//   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2                    (in double)
//   p = p - lr wd p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)   (with the fresh m, v)
//   codes, absmax = quantise(m), quantise(v)                             (per block)
//
// An element whose fresh v is 0 while m is not (possible only when a quantised v underflowed to 0)
// takes no step, instead of m / eps.
//
// Defaults: AdamW's (adamw_beta1 0.9, adamw_beta2 0.999, adamw_eps 1e-8) and adamw_8bit_block_size
// 256. State: 2 bytes per parameter plus 8 bytes per block (two absmax), 2.03 bytes at 256.
// In state() the codes are packed four to a float (bit copies, never used as numbers).
#pragma once

#include <array>
#include <cstdint>

#include "train/optimizer.h"

namespace llm {

namespace q8 {
// The code values, ascending; see above.
const std::array<float, 256>& signed_code();
const std::array<float, 256>& unsigned_code();
// The index of the code value nearest to `x` (already divided by the block's absmax).
uint8_t quantize_signed(float x);
uint8_t quantize_unsigned(float x);
// Quantises `n` values into `codes` and returns the absmax (0 for an all-zero block).
float quantize_block(uint8_t* codes, const float* x, size_t n, bool is_signed);
void dequantize_block(float* x, const uint8_t* codes, size_t n, float absmax, bool is_signed);
}  // namespace q8

class AdamW8bit : public Optimizer {
 public:
  AdamW8bit(double beta1, double beta2, double eps, int block_size)
      : beta1_(beta1), beta2_(beta2), eps_(eps), block_(block_size) {}
  std::string name() const override { return "adamw_8bit"; }
  double state_bytes_per_param() const override { return 2.0 + 8.0 / static_cast<double>(block_); }
  void init(const std::vector<ParamView>& params) override;
  void step(const std::vector<ParamView>& params, double lr, int64_t step) override;
  std::vector<StateBuffer> state() const override;
  void load_state(const std::vector<StateBuffer>& state) override;

  // Dequantised moments of tensor `t` (for tests and diagnostics).
  std::vector<float> first_moment(size_t t) const;
  std::vector<float> second_moment(size_t t) const;

 private:
  struct TensorState {
    std::string tensor;
    std::vector<uint8_t> m_codes, v_codes;  // numel
    std::vector<float> m_absmax, v_absmax;  // one per block
  };
  std::vector<StateSlot> slots() const;

  double beta1_, beta2_, eps_;
  int block_;
  std::vector<TensorState> s_;
};

}  // namespace llm
