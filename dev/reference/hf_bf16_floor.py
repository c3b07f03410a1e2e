"""How close can a bf16 run get to the float64 gradients of the Hugging Face fixtures?

For each fixture of tests/fixtures/hf (written by hf_fixtures.py) this measures, per parameter, the
relative error ||g - g_ref|| / ||g_ref|| of transformers' own gradients against the fixture's float64
reference in two runs:
  floor  float64 arithmetic on weights rounded to bf16: the error of bf16 storage alone, which no bf16
         trainer can avoid (tests/model/test_hf_equal.cpp computes the same number with our CPU reference);
  bf16   the model cast to bfloat16 end to end (logits upcast for the loss), as a bf16 PyTorch run does.
and prints, per fixture, the worst of each and the range of bf16 / floor. These ratios set the bound of
the bf16 whole-model gradient tests (kBf16FloorFactor in test_hf_equal.cpp and test_cuda_lora.cpp).

Usage (a Python with torch, transformers and safetensors; no GPU needed):
    python dev/reference/hf_bf16_floor.py
Measured with torch 2.15 and transformers 5.24 on the CPU (2026-11-30):
    llama_llama3    floor 0.039  bf16 0.075  bf16/floor 1.36 .. 2.90
    llama_yarn      floor 0.039  bf16 0.056  bf16/floor 1.05 .. 1.65
    qwen2_tied      floor 0.049  bf16 0.099  bf16/floor 1.20 .. 2.20
    qwen3_qknorm    floor 0.023  bf16 0.038  bf16/floor 1.24 .. 2.08
    mistral_window  floor 0.068  bf16 0.079  bf16/floor 1.15 .. 1.87
"""
import json
import os

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "hf")
NAMES = ["llama_llama3", "llama_yarn", "qwen2_tied", "qwen3_qknorm", "mistral_window"]


def gradients(folder, inputs, targets, dtype, round_weights):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float64)
    if round_weights:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).double())
    model = model.to(dtype)
    model.eval()
    logits = model(input_ids=inputs).logits.double()
    vocab = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)
    loss.backward()
    return {name: p.grad.double() for name, p in model.named_parameters()}


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    for name in NAMES:
        folder = os.path.join(FIXTURES, name)
        with open(os.path.join(folder, "inputs.json"), encoding="utf-8") as f:
            batch = json.load(f)
        inputs, targets = torch.tensor(batch["inputs"]), torch.tensor(batch["targets"])
        reference = load_file(os.path.join(folder, "reference.safetensors"))
        floor = gradients(folder, inputs, targets, torch.float64, True)
        bf16 = gradients(folder, inputs, targets, torch.bfloat16, False)
        f = {n: relative(floor[n], reference["grad." + n].double()) for n in floor}
        e = {n: relative(bf16[n], reference["grad." + n].double()) for n in bf16}
        ratios = sorted(e[n] / f[n] for n in f)
        print(f"{name:15s} floor {max(f.values()):.3f}  bf16 {max(e.values()):.3f}  "
              f"bf16/floor {ratios[0]:.2f} .. {ratios[-1]:.2f}")


if __name__ == "__main__":
    main()
