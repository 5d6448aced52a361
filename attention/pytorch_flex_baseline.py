#!/usr/bin/env python3
"""PyTorch yardstick for the project's block-sparse and dense attention
(issue 16, Measured): FlexAttention on exactly the block masks of
attention_cuda_benchmark's block_sparse workload, and dense SDPA and
FlexAttention beside its dense workload. A baseline to measure against only:
nothing in the project imports or needs it, and torch is imported only once
the arguments are parsed (--help needs no torch).

Workloads (--workloads, default both):
  block_sparse  batch 1, --heads 8, --head_dim 64, bf16, on every mask in
                --block_masks=DIR, causal and not. The masks come from the
                project itself:
                  bazel run //attention:attention_cuda_benchmark -- \\
                      --workloads= --dump_block_masks=/tmp/block_masks
                writes (with no GPU) each mask of its block_sparse workload
                (MakeBlockMask at n = --block_sparse_length, 131072 by
                default: local_window with blocks of 64 and window 256,
                local_window with blocks of 128 and window 1024, random with
                blocks of 128, density 0.1, seed 0) as DIR/NAME.blockmask:
                one text line "longctx_block_mask name=NAME n=N
                block_size=B blocks=M pairs=P causal_pairs=C", then M * M
                bytes (0/1) row-major [query block, key block]. Both sides so
                run the same masks by construction; the pair counts of the
                header (one head) are checked against the bytes here.
  dense         batch 1, --dense_heads 16, --dense_head_dim 128,
                n = --dense_n 16384, bf16, causal and not: SDPA (the backend
                it picks itself) and FlexAttention.

FlexAttention: torch.nn.attention.flex_attention.flex_attention wrapped in
torch.compile(dynamic=False), with a BlockMask from create_block_mask(
mask_mod, None, None, n, n, device="cuda", BLOCK_SIZE=128, _compile=True)
built before the timing (its build time is printed, never timed). mask_mod
allows token pair (t, u) when its cell of the project's mask is on (the
masks are held on one grid of gcd(block sizes) tokens) and, when causal,
u <= t. The grid and the causal flag are tensors updated in place, read by
one mask_mod: every mask and both causal variants then run the same compiled
kernels (one compilation per pass and shape, not one per mask). FlexAttention
keeps its block size at 128: its default Hopper tiles in recent PyTorch
(forward BLOCK_M 128, backward BLOCK_N1 128) need sparse blocks that are
multiples of 128, so where a 64-token mask's 128-block is partly on,
FlexAttention evaluates mask_mod in it (a "partial" block), as it does on
the causal diagonal.

Timing: CUDA events, median of --repeats runs after --warmup runs (the
first call, which compiles, is timed apart: "1st s"), forward under
no_grad and forward+backward; TFLOP/s with the C++ benchmark's convention:
forward 4 * head_dim * allowed (query, key) pairs, forward+backward 3.5x
that; pairs summed over heads, counted exactly from the block mask (causal
within the diagonal blocks). "peak+GiB": max_memory_allocated during one
run minus what was allocated before it. CUDA only: without torch or a GPU
it exits 1 saying so. Most of its time is compilation: forward and
forward+backward at each of the two shapes.

  python3 attention/pytorch_flex_baseline.py --block_masks=/tmp/block_masks \\
      --json=$OUT/torch_flex.json
"""

import argparse
import itertools
import json
import math
import os
import sys
import time

NAME = "pytorch_flex_baseline"
HEADER_TAG = "longctx_block_mask"
FLEX_BLOCK_SIZE = 128


def fail(message):
    sys.exit(f"{NAME}: {message}")


def ceil_div(a, b):
    return -(-a // b)


# ----------------------------------------------------------------------------
# The project's block masks (no torch needed)


def read_block_mask(path):
    """{"name", "n", "block_size", "blocks", "pairs", "causal_pairs",
    "bytes"} of one file attention_cuda_benchmark --dump_block_masks wrote;
    exits naming the file when it is not one, or when its pair counts
    disagree with its bytes."""
    with open(path, "rb") as f:
        header = f.readline().decode("ascii", "replace").split()
        data = f.read()
    if not header or header[0] != HEADER_TAG:
        fail(f"{path}: not a block mask (expected a first line starting "
             f"with {HEADER_TAG})")
    fields = dict(item.split("=", 1) for item in header[1:] if "=" in item)
    try:
        mask = {"name": fields["name"], "bytes": data}
        for key in ("n", "block_size", "blocks", "pairs", "causal_pairs"):
            mask[key] = int(fields[key])
    except (KeyError, ValueError) as error:
        fail(f"{path}: bad header field {error}")
    if len(data) != mask["blocks"] ** 2:
        fail(f"{path}: {len(data)} mask bytes (expected {mask['blocks']}^2)")
    for causal, key in ((False, "pairs"), (True, "causal_pairs")):
        counted = allowed_pairs(mask, causal)
        if counted != mask[key]:
            fail(f"{path}: the mask's bytes allow {counted} pairs "
                 f"(causal={causal}) but the header says {mask[key]}")
    return mask


def read_block_masks(folder):
    """Every DIR/*.blockmask, by name; all of one sequence length."""
    try:
        names = sorted(f for f in os.listdir(folder)
                       if f.endswith(".blockmask"))
    except OSError as error:
        fail(f"--block_masks: {error}")
    if not names:
        fail(f"--block_masks: no *.blockmask files in {folder} (write them "
             f"with attention_cuda_benchmark --workloads= "
             f"--dump_block_masks={folder})")
    masks = [read_block_mask(os.path.join(folder, name)) for name in names]
    lengths = {mask["n"] for mask in masks}
    if len(lengths) > 1:
        fail(f"--block_masks: masks of several lengths {sorted(lengths)} in "
             f"{folder} (expected one)")
    return masks


def allowed_pairs(mask, causal):
    """Allowed (query, key) pairs of one head under `mask` (the C++
    BlockMaskPairs): an on pair of blocks of sq and sk tokens gives sq * sk
    pairs; when causal, those left of the diagonal the same, a diagonal block
    of s tokens s (s + 1) / 2, those right of it none."""
    bs, m, n = mask["block_size"], mask["blocks"], mask["n"]
    size = [min(bs, n - b * bs) for b in range(m)]
    total = 0
    for q in range(m):
        row = mask["bytes"][q * m:(q + 1) * m]
        keys = itertools.compress(range(m), row)
        if causal:
            total += size[q] * sum(size[k] for k in keys if k < q)
            if row[q]:
                total += size[q] * (size[q] + 1) // 2
        else:
            total += size[q] * sum(size[k] for k in keys)
    return total


# ----------------------------------------------------------------------------
# Timing


def time_passes(attend, inputs, grad_out, flops_forward, args):
    """{pass: {"first_call_s", "ms", "times_ms", "tflops",
    "peak_extra_bytes"}} of attend(q, k, v): "forward" without autograd,
    "forward_backward" with grad_out into fresh leaves. The first call (which
    compiles) is timed apart by the wall clock; then time_cuda of the
    dilated baseline (median of --repeats after --warmup)."""
    import torch
    from pytorch_dilated_baseline import time_cuda

    leaves = [x.detach().requires_grad_() for x in inputs]

    def release():
        for leaf in leaves:
            leaf.grad = None

    def forward():
        with torch.no_grad():
            attend(*inputs)

    def forward_backward():
        release()
        attend(*leaves).backward(grad_out)

    results = {}
    for name, run, done, flops in (
            ("forward", forward, None, flops_forward),
            ("forward_backward", forward_backward, release,
             3.5 * flops_forward)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        ms, times, peak = time_cuda(run, args.warmup, args.repeats, done)
        results[name] = {"first_call_s": first, "ms": ms, "times_ms": times,
                         "tflops": flops / ms / 1e9,
                         "peak_extra_bytes": peak}
    return results


TABLE_HEADER = (f"{'workload':<40} {'n':>7} {'causal':>6} {'pass':<16} "
                f"{'ms':>9} {'TFLOP/s':>8} {'peak+GiB':>8} {'1st s':>6}")


def record(rows, meta, results):
    """Appends one row per pass to `rows` and prints it."""
    for name, r in results.items():
        row = dict(meta, **{"pass": name}, **r)
        rows.append(row)
        print(f"{row['workload']:<40} {row['n']:>7} {row['causal']!s:>6} "
              f"{name:<16} {r['ms']:>9.3f} {r['tflops']:>8.1f} "
              f"{r['peak_extra_bytes'] / 2**30:>8.2f} "
              f"{r['first_call_s']:>6.1f}", flush=True)


# ----------------------------------------------------------------------------
# Workloads


def random_inputs(b, h, n, d):
    """q, k, v and the output gradient: [b, h, n, d] bf16 each, the layout
    SDPA's and FlexAttention's kernels read."""
    import torch
    torch.manual_seed(0)
    return [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
            for _ in range(4)]


def project_mask_mod(masks, device):
    """(mask_mod, select): one FlexAttention mask_mod for every mask of
    `masks` (all of one length n) and both causal variants, and
    select(mask, causal), which makes mask_mod that mask's (token pair (t, u)
    allowed when its block pair is on and, when causal, u <= t). The masks
    are held on one grid of gcd(block sizes) tokens, in a tensor that select
    overwrites in place, beside a 0-dim causal flag: mask_mod, its captured
    tensors and their shapes stay the same, so FlexAttention compiles once
    for them all. A BlockMask built from mask_mod holds until the next
    select."""
    import torch
    n = masks[0]["n"]
    grid = math.gcd(*(mask["block_size"] for mask in masks))
    # [cells, cells]: FlexAttention's length, n padded to its block size;
    # cells from n on stay off (FlexAttention masks padded keys itself).
    cells = ceil_div(ceil_div(n, FLEX_BLOCK_SIZE) * FLEX_BLOCK_SIZE, grid)
    used = ceil_div(n, grid)
    cell_mask = torch.zeros(cells, cells, dtype=torch.bool, device=device)
    causal_flag = torch.zeros((), dtype=torch.bool, device=device)

    def mask_mod(_b, _h, q_idx, kv_idx):
        on = cell_mask[q_idx // grid, kv_idx // grid]
        return on & ((kv_idx <= q_idx) | ~causal_flag)

    def select(mask, causal):
        blocks, repeat = mask["blocks"], mask["block_size"] // grid
        on = torch.frombuffer(bytearray(mask["bytes"]), dtype=torch.uint8)
        # [blocks, blocks] -> [blocks * repeat, blocks * repeat] >= used.
        on = on.view(blocks, blocks).to(device, torch.bool)
        on = on.repeat_interleave(repeat, 0).repeat_interleave(repeat, 1)
        cell_mask.zero_()
        cell_mask[:used, :used] = on[:used, :used]
        causal_flag.fill_(causal)

    return mask_mod, select


def bench_block_sparse(args, masks, flex, rows):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    n, h, d = masks[0]["n"], args.heads, args.head_dim
    mask_mod, select = project_mask_mod(masks, "cuda")
    *qkv, grad_out = random_inputs(1, h, n, d)
    for mask in masks:
        for causal in (False, True):
            select(mask, causal)
            torch.cuda.synchronize()
            start = time.perf_counter()
            block_mask = create_block_mask(
                mask_mod, None, None, n, n, device="cuda",
                BLOCK_SIZE=FLEX_BLOCK_SIZE, _compile=True)
            torch.cuda.synchronize()
            print(f"  {mask['name']} causal={causal}: FlexAttention block "
                  f"mask built in {time.perf_counter() - start:.2f} s "
                  f"(not timed)", flush=True)
            pairs = h * mask["causal_pairs" if causal else "pairs"]
            meta = {"workload": f"flex {mask['name']} h{h} d{d}", "n": n,
                    "batch": 1, "heads": h, "head_dim": d, "causal": causal,
                    "mask": mask["name"], "block_size": mask["block_size"],
                    "flex_block_size": FLEX_BLOCK_SIZE, "pairs": pairs,
                    "dtype": "bfloat16"}
            results = time_passes(
                lambda q, k, v: flex(q, k, v, block_mask=block_mask),
                qkv, grad_out, 4 * d * pairs, args)
            record(rows, meta, results)


def bench_dense(args, flex, rows):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask
    n, h, d = args.dense_n, args.dense_heads, args.dense_head_dim
    causal_flag = torch.zeros((), dtype=torch.bool, device="cuda")

    def mask_mod(_b, _h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | ~causal_flag

    *qkv, grad_out = random_inputs(1, h, n, d)
    for causal in (False, True):
        causal_flag.fill_(causal)
        block_mask = create_block_mask(
            mask_mod, None, None, n, n, device="cuda",
            BLOCK_SIZE=FLEX_BLOCK_SIZE, _compile=True)
        pairs = h * (n * (n + 1) // 2 if causal else n * n)
        for name, attend in (
                ("sdpa", lambda q, k, v: F.scaled_dot_product_attention(
                    q, k, v, is_causal=causal)),
                ("flex", lambda q, k, v: flex(q, k, v,
                                              block_mask=block_mask))):
            meta = {"workload": f"{name} dense h{h} d{d}", "n": n,
                    "batch": 1, "heads": h, "head_dim": d, "causal": causal,
                    "pairs": pairs, "dtype": "bfloat16"}
            results = time_passes(attend, qkv, grad_out, 4 * d * pairs, args)
            record(rows, meta, results)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--workloads", type=lambda s: s.split(","),
                        default=["block_sparse", "dense"],
                        help="block_sparse, dense (comma-separated)")
    parser.add_argument("--block_masks",
                        help="folder of *.blockmask files from "
                             "attention_cuda_benchmark --dump_block_masks")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dense_n", type=int, default=16384)
    parser.add_argument("--dense_heads", type=int, default=16)
    parser.add_argument("--dense_head_dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="file to write every number to")
    args = parser.parse_args()
    masks = None
    unknown = set(args.workloads) - {"block_sparse", "dense"}
    if unknown:
        fail(f"--workloads has {sorted(unknown)} (expected block_sparse, "
             f"dense)")
    if "block_sparse" in args.workloads:
        if not args.block_masks:
            fail("the block_sparse workload needs --block_masks=DIR (write "
                 "DIR with attention_cuda_benchmark --workloads= "
                 "--dump_block_masks=DIR)")
        masks = read_block_masks(args.block_masks)  # before torch
    try:
        import torch
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as error:
        fail(f"needs PyTorch with FlexAttention (2.5 or later): {error}")
    if not torch.cuda.is_available():
        fail("no CUDA device (expected a GPU)")
    from pytorch_dilated_baseline import environment

    started = time.time()
    report = {"environment": environment(), "warmup": args.warmup,
              "repeats": args.repeats,
              "conventions": {
                  "ms": "median of --repeats runs (CUDA events) after "
                        "--warmup runs; first_call_s (wall clock, with "
                        "compilation) apart",
                  "flops": "forward 4 * head_dim * allowed (query, key) "
                           "pairs of all heads; forward_backward 3.5x "
                           "forward",
                  "peak_extra_bytes": "max_memory_allocated during one run "
                                      "minus memory_allocated before it"},
              "rows": []}
    env = report["environment"]
    print(f"PyTorch {env['torch']} CUDA {env['cuda']} on {env['device']}; "
          f"median of {args.repeats} after {args.warmup} warm-up runs; "
          f"FlexAttention compiled, BLOCK_SIZE {FLEX_BLOCK_SIZE}")
    print(TABLE_HEADER, flush=True)
    flex = torch.compile(flex_attention, dynamic=False)
    if "block_sparse" in args.workloads:
        bench_block_sparse(args, masks, flex, report["rows"])
    if "dense" in args.workloads:
        bench_dense(args, flex, report["rows"])
    report["seconds"] = time.time() - started
    print(f"{NAME} took {report['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
