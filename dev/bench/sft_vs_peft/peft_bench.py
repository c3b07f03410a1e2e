#!/usr/bin/env python3
"""The PyTorch side of the SFT benchmark (dev/bench/sft_vs_peft/run.sh): LoRA or QLoRA fine-tuning with
transformers + peft (+ bitsandbytes for QLoRA) on the same model folder, data, sequence length and batch as
./train_sft, timing N optimizer steps after W warm-up steps.

What it does, matching the ./train_sft config that run.sh writes:
  - data: the JSONL's {"prompt", "completion"} as a user and an assistant turn, rendered with the folder's
    chat template (tokenizer.apply_chat_template, which ./train_sft's renderer equals), cut to
    --max-length tokens; completion-only loss (labels -100 on the prompt, i.e. on everything the template
    renders before the assistant's reply); examples left without a label after the cut are dropped (as
    ./train_sft drops them); shuffled with --seed; batches of --batch-size padded on the right to their
    longest example (as ./train_sft pads without packing), attention mask 0 and labels -100 on padding;
  - model: AutoModelForCausalLM in bf16 (`dtype=`, transformers >= 4.56; 5.x warns on `torch_dtype`)
    with SDPA attention; QLoRA: BitsAndBytesConfig(load_in_4bit, nf4, double quantisation, bf16 compute
    dtype); no gradient checkpointing unless --gradient-checkpointing (./train_sft's "recompute"), and no
    prepare_model_for_kbit_training (it would turn on checkpointing and upcast the norms and embedding to
    fp32);
  - LoRA: peft LoraConfig(r, lora_alpha, lora_dropout, all seven projections, bias "none"). peft keeps the
    adapter weights in fp32 (its default autocast_adapter_dtype) and casts a LoRA layer's input to them,
    so without autocast the adapter matmuls and their saved inputs would be fp32. The forward therefore
    runs under torch.autocast(bf16), as the Trainer / TRL SFTTrainer do with bf16=True: fp32 trainable
    weights, bf16 compute, like ./train_sft's fp32 master weights and bf16 working copies
    (--no-autocast to see the difference);
  - step: forward with labels (transformers' mean cross-entropy over the labelled tokens), backward,
    clip_grad_norm_ to 1.0, AdamW (betas 0.9/0.999, eps 1e-8 as ours; fused on CUDA; weight decay 0, lr
    --lr, no schedule), zero_grad; the loss is read back every step (./train_sft does too, which also
    synchronises every step).
Reported: real tokens/s (non-padding tokens, prompt included, as ./train_sft counts them) over the timed
steps, timed between two torch.cuda.synchronize() calls; torch.cuda.max_memory_allocated and
max_memory_reserved since just before the first step (the model, adapters, optimizer state and
activations; not the CUDA context); the versions used. The last line of stdout is one JSON object (the
fields run.sh reads). Exit status 0, or 3 when torch/transformers/peft (or bitsandbytes for QLoRA) is
missing or the device is not usable (a "skipped" result, not a failure).

--device cpu runs the same loop on the CPU (no memory statistics); it is there only to try the harness
on a machine without a GPU, with a tiny model.

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


def load_examples(tok, path, max_length):
    """(ids, labels) per usable example, and how many rendered prompts were not a token prefix."""
    examples, prefix_mismatches = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            messages = [{"role": "user", "content": rec["prompt"]},
                        {"role": "assistant", "content": rec["completion"]}]
            full = tok.apply_chat_template(messages, tokenize=False)
            prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            ids = tok(full, add_special_tokens=False)["input_ids"]
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            # The mask assumes the prompt's tokens start the full text's; say so if a merge crossed them.
            if ids[:len(prompt_ids)] != prompt_ids:
                prefix_mismatches += 1
            ids = ids[:max_length]
            n_prompt = min(len(prompt_ids), len(ids))
            labels = [-100] * n_prompt + ids[n_prompt:]
            # The model shifts labels by one: label 0 is never predicted.
            if any(l != -100 for l in labels[1:]):
                examples.append((ids, labels))
    return examples, prefix_mismatches


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--mode", choices=["lora", "qlora"], default="lora")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--no-autocast", action="store_true", help="no bf16 autocast around the forward")
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be at least 1 and --warmup not negative")

    try:
        import torch
        import transformers
        import peft
    except ImportError as e:
        skipped(a.mode, f"no torch/transformers/peft ({e})")
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        skipped(a.mode, "torch sees no GPU")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__}
    quant = None
    if a.mode == "qlora":
        if not cuda:
            skipped(a.mode, "QLoRA needs bitsandbytes on CUDA")
        try:
            import bitsandbytes
        except Exception as e:  # ImportError, or its own RuntimeError when it finds no usable CUDA library
            skipped(a.mode, f"no bitsandbytes ({type(e).__name__})")
        versions["bitsandbytes"] = bitsandbytes.__version__
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True,
                                                bnb_4bit_compute_dtype=torch.bfloat16)

    random.seed(a.seed)
    torch.manual_seed(a.seed)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    examples, mismatches = load_examples(tok, a.data, a.max_length)
    if mismatches:
        print(f"peft_bench: warning: {mismatches} prompts are not a token prefix of their example",
              file=sys.stderr)
    if len(examples) < a.batch_size:
        print(f"peft_bench: only {len(examples)} usable examples", file=sys.stderr)
        sys.exit(1)
    random.shuffle(examples)
    lengths = [len(ids) for ids, _ in examples]
    print(f"peft_bench: {len(examples)} examples, {min(lengths)}..{max(lengths)} tokens "
          f"(mean {sum(lengths) / len(lengths):.1f})", file=sys.stderr)

    def batches():
        """Padded batches on the device, and their non-padding token count (known without a sync)."""
        i = 0
        while True:
            if i + a.batch_size > len(examples):  # a new epoch; the incomplete tail is left out
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
            real = sum(len(x) for x, _ in chunk)
            yield ids.to(device), labels.to(device), mask.to(device), real

    t_load = time.perf_counter()
    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": 0}  # bitsandbytes quantises while loading onto the GPU
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, **kwargs)
    if quant is None:
        model = model.to(device)
    model.config.use_cache = False
    if a.gradient_checkpointing:
        # Non-reentrant checkpointing recomputes each layer in backward; the frozen embedding's output
        # needs requires_grad for the reentrant variant only, but it costs nothing to set.
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
    trainable_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
    fused = cuda
    try:
        opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused)
    except (TypeError, RuntimeError):  # an old torch, or parameters the fused kernel does not take
        fused = False
        opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    load_s = time.perf_counter() - t_load
    print(f"peft_bench: model on {device} in {load_s:.1f} s, {trainable} trainable parameters "
          f"({'/'.join(trainable_dtypes)}), fused AdamW {fused}, autocast {not a.no_autocast}",
          file=sys.stderr)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def autocast():  # a fresh context per step
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=not a.no_autocast)

    data = batches()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokens, losses, t0 = 0, [], time.perf_counter()
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            sync()
            t0 = time.perf_counter()
        ids, labels, mask, real = next(data)
        with autocast():
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()  # reads back every step, as ./train_sft does
        losses.append(loss)
        if step >= a.warmup:
            tokens += real
        if step < 3 or (step + 1) % 10 == 0 or step + 1 == a.warmup + a.steps:
            print(f"peft_bench: step {step + 1}/{a.warmup + a.steps} loss {loss:.4f}", file=sys.stderr)
    sync()
    seconds = time.perf_counter() - t0
    result = {
        "impl": "peft",
        "mode": a.mode,
        "tokens_per_s": tokens / seconds,
        "timed_steps": a.steps,
        "tokens": tokens,
        "tokens_per_step": tokens / a.steps,
        "seconds": seconds,
        "load_s": load_s,
        "trainable_parameters": trainable,
        "fused_adamw": fused,
        "autocast_bf16": not a.no_autocast,
        "gradient_checkpointing": a.gradient_checkpointing,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "versions": versions,
    }
    if cuda:
        result["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["max_memory_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
