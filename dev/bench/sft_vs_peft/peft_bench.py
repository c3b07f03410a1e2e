#!/usr/bin/env python3
"""The PyTorch side of the SFT benchmark (dev/bench/sft_vs_peft/run.sh): LoRA or QLoRA fine-tuning with
transformers + peft (+ bitsandbytes for QLoRA) on the same model folder, data, sequence length and batch as
./train_sft, timing N optimizer steps after W warm-up steps.

What it does, matching the ./train_sft config that run.sh writes:
  - data: the JSONL's {"prompt", "completion"} as a user and an assistant turn, rendered with the folder's
    chat template (tokenizer.apply_chat_template, which ./train_sft's renderer equals), cut to
    --max-length tokens; completion-only loss (labels -100 on the prompt, i.e. on everything the template
    renders before the assistant's reply); shuffled with --seed; batches of --batch-size padded to their
    longest example (as ./train_sft pads without packing), attention mask 0 and labels -100 on padding;
  - model: AutoModelForCausalLM in bf16 with SDPA attention; QLoRA: BitsAndBytesConfig(load_in_4bit,
    nf4, double quantisation, bf16 compute dtype); no gradient checkpointing unless
    --gradient-checkpointing (./train_sft's "recompute"), and no prepare_model_for_kbit_training (it would
    turn on checkpointing and upcast the norms and embedding to fp32);
  - LoRA: peft LoraConfig(r, lora_alpha, lora_dropout, all seven projections, bias "none"); peft keeps
    the adapter weights in fp32 (its default autocast_adapter_dtype), ./train_sft keeps fp32 master
    weights and bf16 working copies;
  - step: forward with labels (transformers' mean cross-entropy over the counted tokens), backward,
    clip_grad_norm_ to 1.0, AdamW (fused when this torch has it; weight decay 0, lr --lr), zero_grad; the
    loss is read back every step (./train_sft does too).
Reported: real tokens/s (non-padding tokens, prompt included, as ./train_sft counts them) over the timed
steps, torch.cuda.max_memory_allocated and max_memory_reserved since just before the first step (the
model, adapters, optimizer state and activations; not the CUDA context), and the versions used. The last
line is one JSON object (the fields run.sh reads). Exit status 0, or 3 when torch/transformers/peft (or
bitsandbytes for QLoRA) is missing or no GPU is usable (a "skipped" result, not a failure).

  python3 dev/bench/sft_vs_peft/peft_bench.py --model DIR --data FILE.jsonl --mode qlora --max-length 512
"""
import argparse
import json
import random
import sys
import time


def skipped(mode, why):
    print(f"peft_bench: skipped: {why}", file=sys.stderr)
    print(json.dumps({"impl": "peft", "mode": mode, "skipped": why}))
    sys.exit(3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--mode", choices=["lora", "qlora"], default="lora")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()

    try:
        import torch
        import transformers
        import peft
    except ImportError as e:
        skipped(a.mode, f"no torch ({e})")
    if not torch.cuda.is_available():
        skipped(a.mode, "torch sees no GPU")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    quant = None
    if a.mode == "qlora":
        try:
            import bitsandbytes
        except ImportError as e:
            skipped(a.mode, f"no bitsandbytes ({e})")
        versions["bitsandbytes"] = bitsandbytes.__version__
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True,
                                                bnb_4bit_compute_dtype=torch.bfloat16)

    random.seed(a.seed)
    torch.manual_seed(a.seed)
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    # The examples, rendered and masked.
    examples = []
    with open(a.data) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            messages = [{"role": "user", "content": rec["prompt"]},
                        {"role": "assistant", "content": rec["completion"]}]
            full = tok.apply_chat_template(messages, tokenize=False)
            prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            ids = tok(full, add_special_tokens=False)["input_ids"][: a.max_length]
            n_prompt = min(len(tok(prompt, add_special_tokens=False)["input_ids"]), len(ids))
            labels = [-100] * n_prompt + ids[n_prompt:]
            if any(l != -100 for l in labels[1:]):
                examples.append((ids, labels))
    if len(examples) < a.batch_size:
        print(f"peft_bench: only {len(examples)} usable examples", file=sys.stderr)
        sys.exit(1)
    random.shuffle(examples)

    def batches():
        i = 0
        while True:
            if i + a.batch_size > len(examples):
                random.shuffle(examples)
                i = 0
            chunk = examples[i:i + a.batch_size]
            i += a.batch_size
            T = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), T), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for r, (x, y) in enumerate(chunk):
                ids[r, :len(x)] = torch.tensor(x)
                labels[r, :len(y)] = torch.tensor(y)
                mask[r, :len(x)] = 1
            yield ids.cuda(non_blocking=True), labels.cuda(non_blocking=True), mask.cuda(non_blocking=True)

    kwargs = {"torch_dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": 0}
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, **kwargs)
    if quant is None:
        model = model.cuda()
    model.config.use_cache = False
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, bias="none",
                           task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"])
    model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    try:
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, fused=True)
        fused = True
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
        fused = False

    data = batches()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    tokens, losses, t0 = 0, [], None
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids, labels, mask = next(data)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        losses.append(loss)
        if step >= a.warmup:
            tokens += int(mask.sum().item())
        if step < 3 or (step + 1) % 10 == 0:
            print(f"peft_bench: step {step + 1}/{a.warmup + a.steps} loss {loss:.4f}", file=sys.stderr)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = {
        "impl": "peft",
        "mode": a.mode,
        "tokens_per_s": tokens / seconds,
        "timed_steps": a.steps,
        "tokens": tokens,
        "seconds": seconds,
        "max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
        "max_memory_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
        "trainable_parameters": trainable,
        "fused_adamw": fused,
        "gradient_checkpointing": a.gradient_checkpointing,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "gpu": torch.cuda.get_device_name(0),
        "versions": versions,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
