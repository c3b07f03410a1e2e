#!/usr/bin/env python3
"""End-to-end check that ./train_sft's LoRA adapters are PEFT adapters, run by hand (CI needs no Python).

1. writes a tiny random Qwen2 model with transformers (and the fixture BPE tokenizer) to WORK/base, or with
   --llama a Llama model with llama3 RoPE scaling, untied head, the Llama-3 fixture tokenizer and a
   Llama-3.1-Instruct chat template (the one of dev/reference/tokenizer_fixtures.py);
2. runs ./train_sft on it: LoRA on all seven linear layers, rsLoRA, dropout, 20 steps on the CPU;
3. runs ./merge_lora on the saved adapter;
4. loads the base with PEFT's PeftModel.from_pretrained(final_lora_adapters) and the merged folder with
   transformers, and prints the largest logit difference (and how much the adapter moves the logits).

Needs torch, transformers and peft. Usage, from the repository root after `make train_sft merge_lora`:
    python3 dev/reference/sft_adapter_peft_check.py [--llama] [WORK_DIR]
"""
import json
import os
import shutil
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
args = [a for a in sys.argv[1:] if a != "--llama"]
llama = "--llama" in sys.argv[1:]
work = os.path.abspath(args[0] if args else "/tmp/sft_adapter_peft_check")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)

torch.manual_seed(0)
if llama:
    sys.path.insert(0, os.path.join(root, "dev", "reference"))
    from tokenizer_fixtures import LLAMA31_TEMPLATE

    fixture = f"{root}/tests/fixtures/tokenizers/llama3"
    vocab = json.load(open(f"{fixture}/tokenizer.json"))
    vocab_size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    LlamaForCausalLM(config).eval().save_pretrained(f"{work}/base", safe_serialization=True)
    shutil.copy(f"{fixture}/tokenizer.json", f"{work}/base/tokenizer.json")
    tokenizer_config = json.load(open(f"{fixture}/tokenizer_config.json"))
    tokenizer_config["chat_template"] = LLAMA31_TEMPLATE
    with open(f"{work}/base/tokenizer_config.json", "w") as f:
        json.dump(tokenizer_config, f)
else:
    config = Qwen2Config(vocab_size=912, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0)
    Qwen2ForCausalLM(config).eval().save_pretrained(f"{work}/base", safe_serialization=True)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(f"{root}/tests/fixtures/tokenizers/qwen2/{name}", f"{work}/base/{name}")

sft = {"base_model": f"{work}/base", "train_file": "builtin:arithmetic_sft", "max_length": 128, "packing": True,
       "use_lora": True, "lora_preset": "all", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
       "use_rslora": True, "learning_rate": 5e-3, "max_steps": 20, "batch_size": 4,
       "gradient_accumulation_steps": 1, "warmup_steps": 2, "eval_every": 10, "eval_steps": 4, "log_every": 10,
       "save_every": 10, "output_dir": f"{work}/out", "device": "cpu"}
with open(f"{work}/sft.json", "w") as f:
    json.dump(sft, f)
subprocess.run([f"{root}/train_sft", "-c", f"{work}/sft.json", "--fresh"], check=True)
subprocess.run([f"{root}/merge_lora", "--base", f"{work}/base", "--adapter", f"{work}/out/final_lora_adapters",
                "--out", f"{work}/merged"], check=True)

ids = torch.tensor([[3, 17, 250, 9, 800, 41, 5, 77, 100, 12]])
base = AutoModelForCausalLM.from_pretrained(f"{work}/base", torch_dtype=torch.float32).eval()
with torch.no_grad():
    base_logits = base(ids).logits
adapted = PeftModel.from_pretrained(base, f"{work}/out/final_lora_adapters").eval()
with torch.no_grad():
    peft_logits = adapted(ids).logits
merged = AutoModelForCausalLM.from_pretrained(f"{work}/merged", torch_dtype=torch.float32).eval()
with torch.no_grad():
    merged_logits = merged(ids).logits
print(f"the adapter moves the logits by up to {(peft_logits - base_logits).abs().max().item():.3g}")
diff = (peft_logits - merged_logits).abs().max().item()
print(f"max |PEFT(base + our adapter) - our merged folder| = {diff:.3g} "
      f"(logit scale {peft_logits.abs().max().item():.3g})")
sys.exit(0 if diff < 1e-4 else 1)
