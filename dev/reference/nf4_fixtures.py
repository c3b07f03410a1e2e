#!/usr/bin/env python3
"""Write the NF4 / double-quantisation fixture for tests/cpu/test_nf4_bnb.cpp from bitsandbytes itself.

A seeded 128x64 float32 weight (N(0, 0.02^2), with a few larger outliers so block scales differ) is
quantised by bitsandbytes.functional.quantize_4bit(quant_type="nf4", blocksize=64,
compress_statistics=True) and, separately, with compress_statistics=False to get the plain fp32 absmax.
The fixture records (all as JSON lists; floats as float32 bit patterns in uint32 so nothing is lost):
  weight          [8192] fp32 bits, row-major [128, 64]
  packed          [4096] uint8, two codes per byte (bitsandbytes layout: first element in the high nibble)
  absmax          [128]  fp32 bits, one per block of 64
  nf4_code        [16]   fp32 bits, bitsandbytes' NF4 table (quant_state.code)
  nested_code     [256]  uint8, the 8-bit codes of absmax - offset (quant_state.absmax)
  nested_absmax   [1]    fp32 bits, state2.absmax (one block of 256 covers the 128 values)
  nested_offset   fp32 bits, quant_state.offset (mean of absmax)
  dynamic_map     [256]  fp32 bits, state2.code (create_dynamic_map(signed=True))
  dequantized     [8192] fp32 bits, dequantize_4bit with the nested state
  device          where bitsandbytes ran ("cpu" or "cuda")
On the CPU, bitsandbytes quantises NF4 with its pure-PyTorch path (nearest code by midpoints), but the
8-bit blockwise quantiser of the nested absmax runs in its native CPU library, which is not always the
nearest code; the C++ test therefore requires exact nested codes only when device == "cuda" and
otherwise checks that ours are never farther from the value than bitsandbytes'.

Usage (needs torch and bitsandbytes; runs on the CPU, or on a GPU with --device cuda):
    python3 dev/reference/nf4_fixtures.py [--device cuda] > tests/fixtures/nf4/nf4_bnb.json
    python3 dev/reference/nf4_fixtures.py --print-dynamic-map    # C++ literal for kernels/cpu/nf4.h
"""

import argparse
import json
import re
import struct
import sys

import torch
import bitsandbytes
import bitsandbytes.functional as F


def bits(t):
    return [struct.unpack("<I", struct.pack("<f", float(v)))[0] for v in t.detach().float().cpu().reshape(-1).tolist()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--print-dynamic-map", action="store_true")
    args = ap.parse_args()

    if args.print_dynamic_map:
        m = F.create_dynamic_map(signed=True).float().tolist()
        for i in range(0, 256, 4):
            print("    " + " ".join(re.sub(r"\.?0*p", "p", float(v).hex()) + "f," for v in m[i : i + 4]))
        return

    g = torch.Generator().manual_seed(20260101)
    w = torch.randn(128, 64, generator=g, dtype=torch.float32) * 0.02
    w[3, 5] = 0.5
    w[77, 60] = -0.3
    w[120, :] = 0.0  # an all-zero block (row 120 is exactly one block of 64)
    wd = w.to(args.device)

    packed, st = F.quantize_4bit(wd, blocksize=64, compress_statistics=True, quant_type="nf4")
    packed_plain, st_plain = F.quantize_4bit(wd, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(packed, packed_plain)
    deq = F.dequantize_4bit(packed, st)

    out = {
        "bitsandbytes_version": bitsandbytes.__version__,
        "torch_version": torch.__version__,
        "device": args.device,
        "shape": [128, 64],
        "blocksize": 64,
        "nested_blocksize": st.state2.blocksize,
        "weight": bits(w),
        "packed": packed.cpu().reshape(-1).tolist(),
        "absmax": bits(st_plain.absmax),
        "nf4_code": bits(st.code),
        "nested_code": st.absmax.cpu().reshape(-1).tolist(),
        "nested_absmax": bits(st.state2.absmax),
        "nested_offset": bits(st.offset.reshape(1))[0],
        "dynamic_map": bits(st.state2.code),
        "dequantized": bits(deq),
    }
    json.dump(out, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
