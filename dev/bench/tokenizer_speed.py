#!/usr/bin/env python3
"""Encode speed of our byte-level BPE (./tokenize) against the Hugging Face `tokenizers` library on the same
text and the same tokenizer.json, with a check that both produce the same ids.

The text is what this machine has: the Python standard library's sources (code) and the METADATA/README
files of the installed packages (English prose, markdown), plus a multilingual slice made from the test
corpus of dev/reference/tokenizer_fixtures.py. Tokenizers with a 32k vocabulary are trained on part of it,
configured as GPT-2, Llama-3 and Qwen2 (see tokenizer_fixtures.py), and saved to a temporary folder.

Timings: `tokenizers` single-threaded is a loop of Tokenizer.encode over the documents (Python overhead is
negligible at these document sizes); multi-threaded is encode_batch on all cores. Ours is the
tokenization time that ./tokenize reports (--threads 1 and --threads N); neither side counts file reading.
Single-threaded runs are also given per CPU second (process CPU time), which other load on a shared
machine disturbs less than wall time.

Usage (after building ./tokenize):
    python3 dev/bench/tokenizer_speed.py [--mb 16] [--vocab 32000]
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "dev", "reference"))
import tokenizer_fixtures as fx  # noqa: E402


def corpus(limit_bytes):
    docs, total = [], 0
    stdlib = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    prose = sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "*", "METADATA")))
    multilingual = "\n".join(fx.HANDWRITTEN_TRAIN + fx.generated_lines(3000, seed=7) + fx.HELD_OUT)
    sources = [("code", stdlib), ("prose", prose)]
    budget = {"code": limit_bytes * 0.5, "prose": limit_bytes * 0.4}
    for kind, files in sources:
        used = 0
        for path in files:
            try:
                text = open(path, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip() or "<|" in text:
                continue
            docs.append(text)
            used += len(text.encode())
            if used >= budget[kind]:
                break
        total += used
    while total < limit_bytes:
        docs.append(multilingual)
        total += len(multilingual.encode())
    return docs


def train_tokenizers(docs, vocab, folder):
    fx.VOCAB_SIZE = vocab
    sample = docs[::3]
    paths = {}
    for name, maker in [("gpt2", fx.make_gpt2), ("llama3", fx.make_llama3), ("qwen2", fx.make_qwen2)]:
        tok, config = maker(sample)
        path = os.path.join(folder, name)
        os.makedirs(path, exist_ok=True)
        tok.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        paths[name] = path
    return paths


def read_shard(path):
    data = open(path, "rb").read()
    dtype, count = int.from_bytes(data[12:16], "little"), int.from_bytes(data[24:32], "little")
    return np.frombuffer(data[32:], dtype=np.uint16 if dtype == 2 else np.uint32, count=count)


def ours(path, jsonl, out, threads):
    """(wall MB/s, CPU MB/s) of the tokenization ./tokenize reports."""
    run = subprocess.run([os.path.join(ROOT, "tokenize"), "--tokenizer", path, "--input", jsonl, "--output", out,
                          "--threads", str(threads)], capture_output=True, text=True, check=True)
    found = re.search(r"([0-9.]+) MB of text in [0-9.]+ s \(cpu ([0-9.]+) s\): ([0-9.]+) MB/s", run.stdout)
    return float(found.group(3)), float(found.group(1)) / float(found.group(2))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    docs = corpus(int(args.mb * 1e6))
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    cores = os.cpu_count()
    print(f"text: {len(docs)} documents, {megabytes:.1f} MB; {cores} cores")
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.time()
        paths = train_tokenizers(docs, args.vocab, folder)
        print(f"trained 3 tokenizers (vocab {args.vocab}) in {time.time() - t0:.0f} s")
        jsonl = os.path.join(folder, "docs.jsonl")
        with open(jsonl, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        print(f"{'MB/s':10s} {'tokenizers 1T':>14s} {'ours 1T':>9s} {'(per CPU s)':>20s} "
              f"{'tokenizers {}T'.format(cores):>14s} {'ours {}T'.format(cores):>9s}  ids")
        for name, path in paths.items():
            tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
            eos = tok.token_to_id(json.load(open(os.path.join(path, "tokenizer_config.json")))["eos_token"])
            tok.encode(docs[0], add_special_tokens=False)
            start, cpu = time.perf_counter(), time.process_time()
            ids = [tok.encode(d, add_special_tokens=False).ids for d in docs]
            hf_single = megabytes / (time.perf_counter() - start)
            hf_cpu = megabytes / (time.process_time() - cpu)
            start = time.perf_counter()
            tok.encode_batch(docs, add_special_tokens=False)
            hf_multi = megabytes / (time.perf_counter() - start)
            out = os.path.join(folder, name + ".bin")
            our_single, our_cpu = ours(path, jsonl, out, 1)
            our_multi, _ = ours(path, jsonl, out, cores)
            expected = np.concatenate([np.array(i + [eos], dtype=np.int64) for i in ids])
            same = np.array_equal(read_shard(out).astype(np.int64), expected)
            print(f"{name:10s} {hf_single:14.2f} {our_single:9.2f} {hf_cpu:9.2f} vs {our_cpu:6.2f} {hf_multi:14.2f} "
                  f"{our_multi:9.2f}  {'identical' if same else 'DIFFER'} ({len(expected)} tokens)")


if __name__ == "__main__":
    main()
