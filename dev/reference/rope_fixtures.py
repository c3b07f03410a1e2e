#!/usr/bin/env python3
"""Dump RoPE inverse frequencies and attention scalings from Hugging Face transformers.

The C++ test tests/cpu/test_positions.cpp reads the output and checks llm::ref::rope_inv_freq and
llm::ref::rope_attention_scaling against it. transformers computes in float32, so the test compares with a
relative tolerance of a few float32 ulps.

Usage (needs torch and transformers):
    python3 dev/reference/rope_fixtures.py > tests/fixtures/rope_fixtures.json
"""

import json
import sys

import torch
import transformers
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Each case: the fields of our RopeParams (C++ names), turned into an HF rope_parameters dict below.
CASES = [
    {"name": "none_d64", "scaling": "none", "head_dim": 64, "theta": 10000.0},
    {"name": "linear_d64_f4", "scaling": "linear", "head_dim": 64, "theta": 10000.0, "factor": 4.0},
    # Llama 3.1 8B.
    {"name": "llama3_d128_llama31", "scaling": "llama3", "head_dim": 128, "theta": 500000.0, "factor": 8.0,
     "original_max_position": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    # Small context so that all three bands (kept, blended, interpolated) occur.
    {"name": "llama3_d32_small", "scaling": "llama3", "head_dim": 32, "theta": 10000.0, "factor": 4.0,
     "original_max_position": 64, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    # Qwen2.5-style YaRN extension.
    {"name": "yarn_d128_qwen", "scaling": "yarn", "head_dim": 128, "theta": 1000000.0, "factor": 4.0,
     "original_max_position": 32768},
    {"name": "yarn_d32_small", "scaling": "yarn", "head_dim": 32, "theta": 10000.0, "factor": 8.0,
     "original_max_position": 256},
    # Explicit attention factor, non-default betas, no truncation of the correction range.
    {"name": "yarn_d32_explicit", "scaling": "yarn", "head_dim": 32, "theta": 10000.0, "factor": 16.0,
     "original_max_position": 512, "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.5,
     "truncate": False},
    # beta_fast == beta_slow without truncation: the ramp's min == max guard.
    {"name": "yarn_d32_degenerate_ramp", "scaling": "yarn", "head_dim": 32, "theta": 10000.0, "factor": 4.0,
     "original_max_position": 256, "beta_fast": 4.0, "beta_slow": 4.0, "truncate": False},
    {"name": "yarn_d32_factor1", "scaling": "yarn", "head_dim": 32, "theta": 10000.0, "factor": 1.0,
     "original_max_position": 256},
]


def hf_rope_parameters(case):
    params = {"rope_type": "default" if case["scaling"] == "none" else case["scaling"], "rope_theta": case["theta"]}
    if case["scaling"] != "none":
        params["factor"] = case["factor"]
    if case["scaling"] in ("llama3", "yarn"):
        params["original_max_position_embeddings"] = case["original_max_position"]
    if case["scaling"] == "llama3":
        params["low_freq_factor"] = case["low_freq_factor"]
        params["high_freq_factor"] = case["high_freq_factor"]
    if case["scaling"] == "yarn":
        for key in ("beta_fast", "beta_slow", "attention_factor", "truncate"):
            if key in case:
                params[key] = case[key]
    return params


def compute(case):
    config = LlamaConfig(
        hidden_size=case["head_dim"] * 4,
        num_attention_heads=4,
        head_dim=case["head_dim"],
        # The extended context (factor x original), so that HF's consistency check has nothing to warn about.
        max_position_embeddings=int(case.get("factor", 1.0) * case.get("original_max_position", 1024)),
        rope_parameters=hf_rope_parameters(case),
    )
    if case["scaling"] == "none":
        # The unscaled frequencies, exactly as the HF rotary modules compute them.
        dim = case["head_dim"]
        inv_freq = 1.0 / (case["theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
        attention_scaling = 1.0
    else:
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[case["scaling"]](config, "cpu")
    return [float(x) for x in inv_freq.tolist()], float(attention_scaling)


def main():
    out = {"transformers_version": transformers.__version__, "torch_version": torch.__version__, "cases": []}
    for case in CASES:
        inv_freq, attention_scaling = compute(case)
        out["cases"].append({**case, "inv_freq": inv_freq, "attention_scaling": attention_scaling})
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
