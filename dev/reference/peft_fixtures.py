#!/usr/bin/env python3
"""Write the PEFT LoRA fixtures for tests/model/test_lora_adapter.cpp.

A tiny random Qwen2ForCausalLM (hidden 64, 2 layers, 4 query heads, 2 K/V heads, head_dim 16,
intermediate 128, vocab 300, q/k/v biases as Qwen2 has them, untied lm_head) and two LoRA adapters on
it, all written by the real libraries into tests/fixtures/peft/:
  base/            the model, save_pretrained(safe_serialization=True), float32
  adapter/         LoraConfig(r=4, lora_alpha=8, all seven linears, lora_dropout=0), s = alpha / r = 2
  adapter_rslora/  LoraConfig(r=6, lora_alpha=8, use_rslora=True, q_proj and v_proj), s = 8 / sqrt(6)
  expected.json    the input ids (two sequences of 7 tokens), the base model's logits, and each
                   adapter's logits from the PEFT model in eval mode, with the largest difference between
                   those and the logits after merge_and_unload() (a check that the two agree)

Every weight is random (norm weights 1 + noise, biases nonzero) and both LoRA factors are drawn from a
seeded normal (times 0.1), so that B A is nonzero and a wrongly mapped tensor cannot hide. The files
hold the float32 values; the logits are computed from those same values in float64 (model.double();
transformers still takes the RMSNorm statistics in float32, which rounds the normalised activations to
float32 precision, so the unmerged and merged logits come out identical here). Logits are written with
8 significant digits.

Usage (needs torch, transformers, peft, safetensors):
    python3 dev/reference/peft_fixtures.py [OUT_DIR]         # default tests/fixtures/peft
    python3 dev/reference/peft_fixtures.py --check-adapter DIR KEY [FIXTURE_DIR]
        loads adapter folder DIR (e.g. one written by save_peft_adapter) with PeftModel.from_pretrained on
        the fixture's base and compares its logits with expected.json's KEY ("adapter" or
        "adapter_rslora"): the save direction, checked by PEFT itself.
    python3 dev/reference/peft_fixtures.py --check-merged DIR KEY [FIXTURE_DIR]
        loads a merged Hugging Face folder (./merge_lora --out DIR) with transformers and compares.
"""

import json
import os
import sys

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

V = 300
INPUT_IDS = [[1, 17, 42, 299, 5, 123, 77], [3, 250, 8, 64, 199, 2, 150]]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    # key: (LoraConfig kwargs, seed of the factors)
    "adapter": (dict(r=4, lora_alpha=8, target_modules=ALL, use_rslora=False), 1234),
    "adapter_rslora": (dict(r=6, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True), 5678),
}


def base_config():
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, use_sliding_window=False, attention_dropout=0.0, bos_token_id=1,
                  eos_token_id=2)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    else:
        kwargs["rope_theta"] = 10000.0
    config = Qwen2Config(**kwargs)
    config._attn_implementation = "eager"
    return config


def randomize(model, generator):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=generator))


def load_base(folder):
    model = Qwen2ForCausalLM.from_pretrained(folder, attn_implementation="eager").float()
    model.eval()
    return model


def logits_of(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(INPUT_IDS)).logits.double()


def compact(t):
    return [float(f"{v:.8g}") for v in t.reshape(-1).tolist()]


def make(out):
    base_dir = os.path.join(out, "base")
    os.makedirs(base_dir, exist_ok=True)
    generator = torch.Generator().manual_seed(2024)
    model = Qwen2ForCausalLM(base_config())
    model.eval()
    randomize(model, generator)
    model.save_pretrained(base_dir, safe_serialization=True)

    base_logits = logits_of(load_base(base_dir).double())
    expected = {
        "about": "written by dev/reference/peft_fixtures.py; logits are [2, 7, 300] row-major, float64 "
                 "computation on the float32 weights",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "input_ids": INPUT_IDS,
        "vocab_size": V,
        "base_logits": compact(base_logits),
    }

    for key, (kwargs, seed) in ADAPTERS.items():
        model = load_base(base_dir)
        model.name_or_path = "tests/fixtures/peft/base"  # saved as base_model_name_or_path: no absolute path
        config = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kwargs)
        pm = get_peft_model(model, config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(pm.named_parameters()):
                if "lora_A" in name or "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        folder = os.path.join(out, key)
        pm.save_pretrained(folder, safe_serialization=True)
        readme = os.path.join(folder, "README.md")  # an empty model card: not part of the format
        if os.path.exists(readme):
            os.remove(readme)
        pm.eval()
        pm.double()
        peft_logits = logits_of(pm)
        merged = pm.merge_and_unload()
        merged_logits = logits_of(merged)
        diff = (peft_logits - merged_logits).abs().max().item()
        change = (peft_logits - base_logits).abs().max().item()
        assert diff < 1e-9, f"{key}: PEFT and merged logits differ by {diff}"
        assert change > 0.1, f"{key}: the adapter barely changes the logits ({change})"
        scale = kwargs["lora_alpha"] / (kwargs["r"] ** 0.5 if kwargs["use_rslora"] else kwargs["r"])
        expected[key] = {"r": kwargs["r"], "lora_alpha": kwargs["lora_alpha"], "use_rslora": kwargs["use_rslora"],
                         "target_modules": kwargs["target_modules"], "scale": scale,
                         "merged_max_abs_diff": diff, "max_abs_change_from_base": change,
                         "logits": compact(peft_logits)}
        print(f"{key}: scale {scale:.6g}, |peft - merged| {diff:.3g}, |peft - base| {change:.3g}")

    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, separators=(",", ":"))
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(out) for n in names)
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


def compare(logits, fixture_dir, key):
    with open(os.path.join(fixture_dir, "expected.json")) as f:
        expected = json.load(f)
    want = torch.tensor(expected[key]["logits"], dtype=torch.float64)
    diff = (logits.reshape(-1) - want).abs().max().item()
    print(f"max |logits - expected[{key}]| = {diff:.3g}")
    return diff


def check_adapter(adapter_dir, key, fixture_dir):
    model = load_base(os.path.join(fixture_dir, "base"))
    pm = PeftModel.from_pretrained(model, adapter_dir)
    pm.eval()
    pm.double()
    return compare(logits_of(pm), fixture_dir, key)


def check_merged(merged_dir, key, fixture_dir):
    model = load_base(merged_dir).double()
    return compare(logits_of(model), fixture_dir, key)


if __name__ == "__main__":
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "peft")
    if len(sys.argv) >= 4 and sys.argv[1] in ("--check-adapter", "--check-merged"):
        fixture_dir = sys.argv[4] if len(sys.argv) > 4 else default
        check = check_adapter if sys.argv[1] == "--check-adapter" else check_merged
        sys.exit(0 if check(sys.argv[2], sys.argv[3], fixture_dir) < 1e-4 else 1)
    make(os.path.normpath(sys.argv[1] if len(sys.argv) > 1 else default))
