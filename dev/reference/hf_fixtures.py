#!/usr/bin/env python3
"""Write Hugging Face model fixtures for tests/model/test_hf_equal.cpp.

Five tiny random models, each saved as a Hugging Face folder (config.json, generation_config.json,
model.safetensors via save_pretrained) under tests/fixtures/hf/<name>/, with:
  inputs.json          input ids, targets, the loss, and how they were made
  reference.safetensors "logits" [B, T, V] and "grad.<parameter name>" for every parameter (float32)

The cases cover the options the C++ importer maps:
  llama_llama3   LlamaForCausalLM, GQA (4 query heads, 2 K/V heads), llama3 RoPE scaling with a
                 wavelength in each of the kept / blended / interpolated bands, untied lm_head
  llama_yarn     LlamaForCausalLM, MHA, YaRN RoPE (ramp over several pairs, default attention factor)
  qwen2_tied     Qwen2ForCausalLM, q/k/v bias, tied embeddings, sliding_window given but
                 use_sliding_window false (so no window: the importer must ignore it)
  qwen3_qknorm   Qwen3ForCausalLM, explicit head_dim (16 with hidden 32 and 4 heads), q/k RMSNorm
  mistral_window MistralForCausalLM, MQA, sliding_window 5 < T = 16, eager attention (the script checks
                 that the window changes the logits, i.e. that transformers really applies it)

Every parameter is drawn at random (norm weights 1 + noise, biases nonzero), so that a wrongly mapped
tensor cannot hide behind an identity initialisation. The weights are saved in float32; the reference
runs the same float32 values in float64 (model.double(); transformers still takes the softmax, RMSNorm
statistics and RoPE angles in float32). Dropout is off (eval mode).

Targets are next-token targets aligned with the inputs (targets[b, t] is the token that should follow
position t; -100 is ignored), i.e. what the C++ Model::forward takes. The loss is the mean cross-entropy
over non-ignored targets; the script checks that it equals transformers' own loss from labels (which
shifts internally).

Usage (needs torch, transformers, safetensors):
    python3 dev/reference/hf_fixtures.py [OUT_DIR]      # default tests/fixtures/hf
    python3 dev/reference/hf_fixtures.py --check-export DIR FIXTURE_DIR
        loads DIR (a folder written by ./convert --hf-out) with transformers and checks that it gives the
        fixture's logits: the export direction, checked by transformers itself.
"""

import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

B, T, V = 2, 16, 128


def common(**kwargs):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=V, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, attention_dropout=0.0)
    base.update(kwargs)
    return base


CASES = {
    "llama_llama3": (LlamaForCausalLM, LlamaConfig(**common(
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128}))),
    "llama_yarn": (LlamaForCausalLM, LlamaConfig(**common(
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                         "original_max_position_embeddings": 64}))),
    "qwen2_tied": (Qwen2ForCausalLM, Qwen2Config(**common(
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-6,
        use_sliding_window=False, sliding_window=4, rope_parameters={"rope_type": "default",
                                                                     "rope_theta": 1000000.0}))),
    "qwen3_qknorm": (Qwen3ForCausalLM, Qwen3Config(**common(
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))),
    "mistral_window": (MistralForCausalLM, MistralConfig(**common(
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False, sliding_window=5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))),
}


def randomize(model, generator):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=generator))


def batch(generator):
    inputs = torch.randint(0, V, (B, T), generator=generator)
    targets = torch.randint(0, V, (B, T), generator=generator)
    targets[0, 3] = -100
    targets[1, 0] = -100
    targets[1, 9] = -100
    return inputs, targets


def make(name, model_class, config, out_root):
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    config._attn_implementation = "eager"
    model = model_class(config)
    model.eval()
    randomize(model, generator)
    folder = os.path.join(out_root, name)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)

    inputs, targets = batch(generator)
    model.double()
    out = model(input_ids=inputs)
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    loss.backward()

    # transformers' own loss takes labels aligned with the inputs and shifts them: labels[t + 1] = targets[t].
    labels = torch.full((B, T), -100, dtype=torch.long)
    labels[:, 1:] = targets[:, :-1]
    with torch.no_grad():
        hf_loss = model(input_ids=inputs, labels=labels).loss
        # Same loss over the first T-1 positions only; compare against ours restricted the same way.
        own = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), targets[:, :-1].reshape(-1),
                                                ignore_index=-100)
    assert abs(hf_loss.item() - own.item()) < 1e-6 * max(1.0, abs(own.item())), (name, hf_loss, own)

    if name == "mistral_window":
        # The window must matter: the same model without it gives different logits for t >= window.
        with torch.no_grad():
            config_no_window = MistralConfig(**{**config.to_dict(), "sliding_window": None})
            config_no_window._attn_implementation = "eager"
            unwindowed = MistralForCausalLM(config_no_window).double()
            unwindowed.load_state_dict(model.state_dict())
            unwindowed.eval()
            other = unwindowed(input_ids=inputs).logits
            window = config.sliding_window
            assert torch.allclose(other[:, :window], logits[:, :window], atol=1e-10), "window changed early rows"
            assert (other[:, window:] - logits[:, window:]).abs().max() > 1e-3, "sliding window not applied"

    reference = {"logits": logits.detach().float().contiguous()}
    for pname, p in model.named_parameters():
        reference["grad." + pname] = p.grad.detach().float().contiguous()
    save_file(reference, os.path.join(folder, "reference.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "inputs.json"), "w") as f:
        json.dump({
            "architecture": type(model).__name__,
            "B": B, "T": T,
            "inputs": inputs.tolist(),
            "targets": targets.tolist(),
            "loss": loss.item(),
            "compute_dtype": "float64 (weights are the float32 values saved in model.safetensors)",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }, f)
    print(f"{name}: loss {loss.item():.6f}, {sum(p.numel() for p in model.parameters())} parameters",
          file=sys.stderr)


def check_export(folder, fixture):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    with open(os.path.join(fixture, "inputs.json")) as f:
        inputs = torch.tensor(json.load(f)["inputs"])
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    model.double()
    with torch.no_grad():
        logits = model(input_ids=inputs).logits.float()
    expected = load_file(os.path.join(fixture, "reference.safetensors"))["logits"]
    error = ((logits - expected).norm() / expected.norm()).item()
    print(f"{folder}: {type(model).__name__}, logits relative error {error:.2e}")
    assert error < 1e-5, error


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--check-export":
        check_export(sys.argv[2], sys.argv[3])
        return
    out_root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..",
                                                                  "tests", "fixtures", "hf")
    torch.manual_seed(0)
    for name, (model_class, config) in CASES.items():
        make(name, model_class, config, out_root)


if __name__ == "__main__":
    main()
