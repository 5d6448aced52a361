#!/usr/bin/env python3
"""PyTorch yardstick for the project's dilated attention (issue 7,
Performance). A baseline to measure against only: nothing in the project
imports or needs it, and it needs torch and safetensors, which the project
does not.

It computes the exact semantics of SPEC.md section 2 (attention/pattern.h)
with torch.nn.functional.scaled_dot_product_attention: for each head group
g (heads split into groups of num_heads // G, the first num_heads % G one
larger) with pattern (w_g, r_g, offset g % r_g), the rows the pattern selects
are picked by strided views (x.unflatten(1, (segments, w))[:, :, o::r, h0:h1],
no index tensors), one SDPA call covers all whole segments of the group as a
batch of batch * segments sequences (is_causal for causal attention; the
selected rows of a segment keep their order, so u <= t is the causal mask of
the gathered rows), a short last segment (w not dividing n) gets a call of
its own, and the results are copied back into a zero output (rows no
pattern selects stay 0). The "all heads" layout (every head has every pattern)
exists only in the explicit-mask oracle below, for checks on small inputs.

Modes (python3 attention/pytorch_dilated_baseline.py MODE --help):
  bench     issue 7's workload 1 (dilated attention, bf16, batch 1, 12 heads,
            head_dim 64, segments 2048,4096,8192, rates 1,2,4, head groups,
            n = 131072 and 1048576, causal and not, forward and
            forward+backward) and workload 2 (dense SDPA, bf16, n = 16384,
            head_dim 128, batch 1, 16 heads, causal and not), with each of the
            SDPA backends flash, efficient and cudnn; prints a table (the
            fastest backend of each row, named) and writes every number to
            --json. CUDA only. About 30-60 s on an H200 with the defaults.
              python3 attention/pytorch_dilated_baseline.py bench \\
                  --json=$OUT/torch_attn.json
  check     writes random inputs DIR/<case>.in.safetensors (q, k, v,
            grad_out: float32 [batch, n, heads, head_dim], what attention_cli
            --input reads) and float64 references DIR/<case>.ref.safetensors
            (out, grad_q, grad_k, grad_v [batch, n, heads, head_dim], lse
            [batch, heads, n] with -inf where a query has no key, as
            attention_cli --output writes them) from the explicit-mask oracle,
            and DIR/cases.json with each case's attention_cli flags; it also
            checks this file's SDPA path against the oracle (float64, and on
            CUDA bf16 with each backend). Keep DIR out of $OUT: the files are
            tens of MB. A few seconds on an H200 (a minute or two on CPUs).
              python3 attention/pytorch_dilated_baseline.py check \\
                  --dir=/tmp/attention_check
  compare   runs attention_cli on every case of DIR (--cli=PATH; without it,
            reads outputs DIR/<case>.<device>_<dtype>.safetensors already
            there) and prints each tensor's relative error
            ||ours - ref|| / ||ref|| (lse: over its finite entries, and its
            -inf entries must match) against the tolerance of the dtype
            (float64 1e-10, float32 1e-5, bfloat16 2e-2), PASS or FAIL per
            case; exits 1 on any FAIL.
              python3 attention/pytorch_dilated_baseline.py compare \\
                  --dir=/tmp/attention_check \\
                  --cli=bazel-bin/attention/attention_cli \\
                  --device=cuda --dtype=bfloat16
  selftest  the SDPA path against the oracle, and the oracle against a loop
            written straight from the SPEC's formulas, on many tiny random
            shapes (partial last segments, rates above the segment length,
            fewer heads than groups, causal or not); CPU or CUDA, seconds.
"""

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# Patterns (SPEC.md section 2)


def head_group_ranges(num_heads, num_groups):
    """[(h0, h1)] per group: sizes num_heads // G, the first num_heads % G one
    larger (groups beyond num_heads are empty)."""
    base, extra = divmod(num_heads, num_groups)
    ranges, h0 = [], 0
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        ranges.append((h0, h0 + size))
        h0 += size
    return ranges


def head_patterns(num_heads, segment_lengths, dilation_rates, layout):
    """The patterns (w, r, o) of every head: [num_heads][patterns]."""
    pairs = list(zip(segment_lengths, dilation_rates))
    if layout == "head_groups":
        patterns = [None] * num_heads
        for g, (h0, h1) in enumerate(head_group_ranges(num_heads, len(pairs))):
            w, r = pairs[g]
            for j in range(h0, h1):
                patterns[j] = [(w, r, g % r)]
        return patterns
    if layout == "all_heads":
        return [[(w, r, j % r) for w, r in pairs] for j in range(num_heads)]
    raise ValueError(
        f"head layout {layout!r} (expected head_groups or all_heads)")


def _pattern_chunks(n, w, r, o):
    """(start, segments, length) of the runs of equal segments of pattern
    (w, r, o) over n tokens that select at least one row: the whole segments,
    then the short last one."""
    whole = n // w
    chunks = []
    if whole > 0 and o < w:
        chunks.append((0, whole, w))
    tail = n - whole * w
    if tail > o:
        chunks.append((whole * w, 1, tail))
    return chunks


def selected_pairs(n, w, r, o, causal):
    """(query, key) pairs pattern (w, r, o) allows for one head."""
    total = 0
    for _, segments, length in _pattern_chunks(n, w, r, o):
        m = len(range(o, length, r))
        total += segments * (m * (m + 1) // 2 if causal else m * m)
    return total


def head_group_pairs(n, num_heads, segment_lengths, dilation_rates, causal):
    """Allowed (query, key) pairs summed over heads, head-groups layout."""
    return sum(
        selected_pairs(n, w, r, o, causal)
        for patterns in head_patterns(
            num_heads, segment_lengths, dilation_rates, "head_groups")
        for w, r, o in patterns)


# ----------------------------------------------------------------------------
# The yardstick: SDPA per head group on strided views


def _rows(x, call):
    """The rows of x [batch, n, heads, head_dim] that one SDPA call of
    _sdpa_calls covers: a view [batch, segments, m, h1 - h0, head_dim]."""
    h0, h1, r, o, start, segments, length = call
    return x[:, start:start + segments * length].unflatten(
        1, (segments, length))[:, :, o::r, h0:h1]


def _sdpa_calls(n, heads, segment_lengths, dilation_rates):
    """One (h0, h1, r, o, start, segments, length) per SDPA call: per head
    group, its whole segments as one batch, then its short last segment."""
    groups = head_group_ranges(heads, len(segment_lengths))
    for g, ((h0, h1), w, r) in enumerate(
            zip(groups, segment_lengths, dilation_rates)):
        if h0 < h1:
            for chunk in _pattern_chunks(n, w, r, g % r):
                yield (h0, h1, r, g % r, *chunk)


def _heads_first(rows):
    """[batch, segments, m, heads, head_dim] rows -> SDPA's [batch *
    segments, heads, m, head_dim] (a view when the segments tile the
    sequence, as in the benchmarks)."""
    batch, segments, m, heads, head_dim = rows.shape
    return rows.reshape(batch * segments, m, heads, head_dim).transpose(1, 2)


def dilated_attention(q, k, v, segment_lengths, dilation_rates, causal,
                      scale=None):
    """Dilated attention, head-groups layout, of q, k, v [batch, n, heads,
    head_dim]; returns out of the same shape (differentiable)."""
    out = q.new_zeros(q.shape)
    for call in _sdpa_calls(q.shape[1], q.shape[2], segment_lengths,
                            dilation_rates):
        rows = [_rows(x, call) for x in (q, k, v)]
        attended = F.scaled_dot_product_attention(
            *[_heads_first(x) for x in rows], is_causal=causal, scale=scale)
        _rows(out, call).copy_(attended.transpose(1, 2).reshape(rows[0].shape))
    return out


# ----------------------------------------------------------------------------
# The oracle: explicit masks, any layout, float64


def _pair_counts(n, patterns, causal, device):
    """[n, n] float64: how many of `patterns` allow query t to attend key u
    (0 where u > t when causal)."""
    t = torch.arange(n, device=device)
    count = torch.zeros(n, n, dtype=torch.float64, device=device)
    for w, r, o in patterns:
        selected = (t % w) % r == o
        segment = t // w
        count += (selected[:, None] & selected[None, :]
                  & (segment[:, None] == segment[None, :]))
    if causal:
        count *= t[None, :] <= t[:, None]
    return count


def oracle_attention(q, k, v, grad_out, patterns, causal, scale=None):
    """SPEC.md's formulas with an explicit [n, n] weight per head: out
    [batch, n, heads, head_dim] and lse [batch, heads, n] (-inf where a query
    has no key) in float64 and, when grad_out is given, grad_q, grad_k,
    grad_v. patterns: [heads][(w, r, o)]. One head at a time (n^2 memory)."""
    q, k, v = (x.detach().double() for x in (q, k, v))
    batch, n, heads, head_dim = q.shape
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros_like(q)
    lse = torch.empty(batch, heads, n, dtype=torch.float64, device=q.device)
    grads = [torch.zeros_like(q) for _ in range(3)]
    cached = None  # (patterns, log of their pair counts, rows with a key)
    for j in range(heads):
        if cached is None or cached[0] != patterns[j]:
            count = _pair_counts(n, patterns[j], causal, q.device)
            cached = (patterns[j], count.log(), count.sum(-1) > 0)
            del count
        _, log_count, has_key = cached
        leaves = [x[:, :, j].clone().requires_grad_() for x in (q, k, v)]
        qj, kj, vj = leaves
        with torch.enable_grad():
            # log(count) adds a pair once per pattern that allows it, and
            # -inf where none does; rows with no key are zeroed apart.
            logits = torch.where(
                has_key[:, None],
                scale * qj @ kj.transpose(1, 2) + log_count, 0.0)
            row_lse = torch.logsumexp(logits, -1)
            weights = torch.exp(logits - row_lse[..., None]) * has_key[:, None]
            out_j = weights @ vj
        out[:, :, j] = out_j.detach()
        lse[:, j] = torch.where(has_key, row_lse.detach(), -math.inf)
        if grad_out is not None:
            for grad, g in zip(grads, torch.autograd.grad(
                    out_j, leaves, grad_out[:, :, j].double())):
                grad[:, :, j] = g
        del logits, row_lse, weights, out_j
    result = {"out": out, "lse": lse}
    if grad_out is not None:
        result.update(grad_q=grads[0], grad_k=grads[1], grad_v=grads[2])
    return result


def _loop_oracle(q, k, v, patterns, causal):
    """out and lse of SPEC.md's formulas by plain loops over (t, u), for tiny
    inputs: checks the oracle's log-count trick."""
    batch, n, heads, head_dim = q.shape
    scale = 1 / math.sqrt(head_dim)
    out = torch.zeros(batch, n, heads, head_dim, dtype=torch.float64)
    lse = torch.full((batch, heads, n), -math.inf, dtype=torch.float64)
    for b in range(batch):
        for j in range(heads):
            for t in range(n):
                weights = []
                for u in range(n):
                    count = sum(
                        1 for w, r, o in patterns[j]
                        if (t % w) % r == o and (u % w) % r == o
                        and t // w == u // w)
                    if causal and u > t:
                        count = 0
                    if count:
                        s = scale * float(q[b, t, j] @ k[b, u, j])
                        weights.append((u, count, s))
                if not weights:
                    continue
                top = max(s for _, _, s in weights)
                total = sum(c * math.exp(s - top) for _, c, s in weights)
                lse[b, j, t] = top + math.log(total)
                for u, c, s in weights:
                    out[b, t, j] += c * math.exp(s - top) / total * v[b, u, j]
    return out, lse


# ----------------------------------------------------------------------------
# SDPA backends and timing

BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def backend_context(name):
    """A context manager that lets SDPA use only backend `name`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, BACKENDS[name])])


def default_backend(q, k, v, causal):
    """The name of the backend SDPA picks by itself for these 4-d inputs."""
    try:
        from torch.nn.attention import SDPBackend
        choice = SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, causal))
        names = {getattr(SDPBackend, v): k for k, v in BACKENDS.items()}
        return names.get(choice, choice.name)
    except Exception as error:  # a private API: report, never fail
        return f"unknown ({type(error).__name__})"


def time_cuda(fn, warmup, repeats, release=None):
    """Median milliseconds of fn() over `repeats` runs after `warmup` runs
    (CUDA events), the times, and the peak bytes allocated during one more
    run above what was allocated before it (after release(), which frees what
    the previous run left behind, such as gradients)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    if release is not None:
        release()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    if release is not None:
        release()
    return statistics.median(times), times, peak


def _try_backends(names, run, warmup, repeats, release=None):
    """{backend: {"ms", "times_ms", "peak_extra_bytes"} or {"error"}} of
    run() under each backend (time_cuda's release)."""
    results = {}
    for name in names:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with backend_context(name):
                    ms, times, peak = time_cuda(run, warmup, repeats,
                                                release)
                results[name] = {"ms": ms, "times_ms": times,
                                 "peak_extra_bytes": peak}
            except RuntimeError as error:
                reasons = [str(w.message).splitlines()[0] for w in caught]
                results[name] = {"error": " | ".join(
                    [str(error).splitlines()[0]] + reasons)[:600]}
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    return results


def _best(results):
    timed = {k: r for k, r in results.items() if "ms" in r}
    if not timed:
        return None, None
    name = min(timed, key=lambda k: timed[k]["ms"])
    return name, timed[name]


# ----------------------------------------------------------------------------
# bench


def _bench_passes(attend, inputs, grad_out, meta, flops_forward, args, rows):
    """Times attend(q, k, v) forward (no autograd) and forward+backward (with
    grad_out) under each backend of args.backends; appends one row per pass
    to `rows` and prints it."""
    batch, n = meta["batch"], meta["n"]
    for mode in ("forward", "forward_backward"):
        if mode == "forward":
            def run():
                with torch.no_grad():
                    attend(*inputs)
            flops, release = flops_forward, None
        else:
            leaves = [x.detach().requires_grad_() for x in inputs]

            def release():
                for leaf in leaves:
                    leaf.grad = None

            def run():
                release()
                attend(*leaves).backward(grad_out)
            flops = 3.5 * flops_forward
        results = _try_backends(args.backends, run, args.warmup, args.repeats,
                                release)
        name, best = _best(results)
        row = dict(meta, **{"pass": mode, "flops": flops, "backends": results,
                            "backend": name})
        if best is not None:
            seconds = best["ms"] / 1e3
            row.update(ms=best["ms"], tokens_per_s=batch * n / seconds,
                       tflops=flops / seconds / 1e12,
                       peak_extra_bytes=best["peak_extra_bytes"])
        rows.append(row)
        print_row(row)


def bench_dilated(args, rows):
    segs, rates = args.segment_lengths, args.dilation_rates
    b, h, d = args.batch, args.heads, args.head_dim
    for n in args.lengths:
        torch.manual_seed(0)
        q, k, v, grad_out = (
            torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
            for _ in range(4))
        first_call = next(_sdpa_calls(n, h, segs, rates))
        for causal in (False, True):
            pairs = b * head_group_pairs(n, h, segs, rates, causal)
            meta = {
                "workload": "dilated", "n": n, "batch": b, "heads": h,
                "head_dim": d, "segment_lengths": segs,
                "dilation_rates": rates, "head_layout": "head_groups",
                "causal": causal, "dtype": "bfloat16", "pairs": pairs,
                "default_backend": default_backend(
                    *[_heads_first(_rows(x, first_call)) for x in (q, k, v)],
                    causal),
            }
            _bench_passes(
                lambda q, k, v: dilated_attention(q, k, v, segs, rates, causal),
                (q, k, v), grad_out, meta, 4 * d * pairs, args, rows)
        del q, k, v, grad_out
        torch.cuda.empty_cache()


def bench_dense(args, rows):
    b, h, d, n = (args.dense_batch, args.dense_heads, args.dense_head_dim,
                  args.dense_n)
    torch.manual_seed(0)
    # Our layout [batch, n, heads, head_dim]; SDPA gets [batch, heads, n,
    # head_dim] views of it (the layout flash attention itself reads).
    q, k, v, grad_out = (
        torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
        .transpose(1, 2) for _ in range(4))
    for causal in (False, True):
        pairs = b * h * (n * (n + 1) // 2 if causal else n * n)
        meta = {"workload": "dense", "n": n, "batch": b, "heads": h,
                "head_dim": d, "causal": causal, "dtype": "bfloat16",
                "pairs": pairs,
                "default_backend": default_backend(q, k, v, causal)}
        _bench_passes(
            lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, is_causal=causal),
            (q, k, v), grad_out, meta, 4 * d * pairs, args, rows)


TABLE_HEADER = (f"{'workload':<8} {'n':>8} {'causal':>6} {'pass':<16} "
                f"{'backend':<9} {'ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} "
                f"{'peak+GiB':>8}  other backends (ms)")


def print_row(row):
    others = ", ".join(
        f"{k} {r['ms']:.2f}" if "ms" in r else f"{k} n/a"
        for k, r in row["backends"].items() if k != row["backend"])
    if row["backend"] is None:
        print(f"{row['workload']:<8} {row['n']:>8} {row['causal']!s:>6} "
              f"{row['pass']:<16} no backend ran: " + "; ".join(
                  f"{k}: {r['error']}" for k, r in row["backends"].items()),
              flush=True)
        return
    print(f"{row['workload']:<8} {row['n']:>8} {row['causal']!s:>6} "
          f"{row['pass']:<16} {row['backend']:<9} {row['ms']:>9.3f} "
          f"{row['tokens_per_s']:>10.3g} {row['tflops']:>8.1f} "
          f"{row['peak_extra_bytes'] / 2**30:>8.2f}  {others}"
          f"{'; ' if others else ''}SDPA's own choice: "
          f"{row['default_backend']}", flush=True)


def environment():
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "multiprocessors": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "sdpa_enabled": {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        },
    }


def cmd_bench(args):
    if not torch.cuda.is_available():
        sys.exit("bench: no CUDA device (expected a GPU)")
    started = time.time()
    report = {"environment": environment(), "warmup": args.warmup,
              "repeats": args.repeats,
              "conventions": {
                  "ms": "median of --repeats runs (CUDA events) after "
                        "--warmup runs, of the fastest backend",
                  "flops": "forward 4 * head_dim * allowed (query, key) "
                           "pairs; forward_backward 3.5x forward",
                  "peak_extra_bytes": "max_memory_allocated during one run "
                                      "minus memory_allocated before it "
                                      "(q, k, v and grad_out excluded; out "
                                      "and the gradients included)",
                  "tokens_per_s": "batch * n / (ms / 1000)"},
              "rows": []}
    env = report["environment"]
    print(f"PyTorch {env['torch']} CUDA {env['cuda']} cuDNN {env['cudnn']} "
          f"on {env['device']}; SDPA backends tried: "
          f"{', '.join(args.backends)}; median of {args.repeats} after "
          f"{args.warmup} warm-up runs")
    print(f"dilated: batch {args.batch}, heads {args.heads}, head_dim "
          f"{args.head_dim}, segments {args.segment_lengths}, rates "
          f"{args.dilation_rates}, head_groups, bf16; dense: batch "
          f"{args.dense_batch}, heads {args.dense_heads}, head_dim "
          f"{args.dense_head_dim}, n {args.dense_n}, bf16")
    print(TABLE_HEADER, flush=True)
    if "dilated" in args.workloads:
        bench_dilated(args, report["rows"])
    if "dense" in args.workloads:
        bench_dense(args, report["rows"])
    report["seconds"] = time.time() - started
    print(f"bench took {report['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")


# ----------------------------------------------------------------------------
# check / compare

CHECK_CASES = [
    dict(name="dilated_groups", batch=2, n=4133, heads=5, head_dim=64,
         pattern="dilated", segment_lengths=[512, 1024], dilation_rates=[1, 2],
         head_layout="head_groups", causal=False),
    dict(name="dilated_groups_causal", batch=2, n=4133, heads=5, head_dim=64,
         pattern="dilated", segment_lengths=[512, 1024], dilation_rates=[1, 2],
         head_layout="head_groups", causal=True),
    dict(name="dilated_three_groups_causal", batch=1, n=4133, heads=7,
         head_dim=64, pattern="dilated", segment_lengths=[256, 512, 1024],
         dilation_rates=[1, 2, 4], head_layout="head_groups", causal=True),
    dict(name="dilated_all_heads_causal", batch=1, n=4133, heads=4,
         head_dim=64, pattern="dilated", segment_lengths=[512, 1024],
         dilation_rates=[1, 2], head_layout="all_heads", causal=True),
    dict(name="dense", batch=1, n=1031, heads=3, head_dim=128,
         pattern="dense", causal=False),
    dict(name="dense_causal", batch=1, n=1031, heads=3, head_dim=128,
         pattern="dense", causal=True),
    # The benchmark's pattern, with a short last segment; n^2 float64 per
    # head (2 GiB): on CUDA only.
    dict(name="bench_pattern_causal", batch=1, n=16485, heads=12,
         head_dim=64, pattern="dilated", segment_lengths=[2048, 4096, 8192],
         dilation_rates=[1, 2, 4], head_layout="head_groups", causal=True,
         cuda_only=True),
]

TOLERANCES = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}


def case_patterns(case):
    if case["pattern"] == "dense":
        return [[(case["n"], 1, 0)]] * case["heads"]
    return head_patterns(case["heads"], case["segment_lengths"],
                         case["dilation_rates"], case["head_layout"])


def case_cli_flags(case):
    flags = [f"--pattern={case['pattern']}"]
    if case["pattern"] == "dilated":
        flags += [
            "--segment_lengths=" + ",".join(map(str, case["segment_lengths"])),
            "--dilation_rates=" + ",".join(map(str, case["dilation_rates"])),
            f"--head_layout={case['head_layout']}"]
    flags.append(f"--causal={'true' if case['causal'] else 'false'}")
    return flags


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64 over the entries where
    expected is finite, and whether the non-finite entries agree exactly
    (NaN anywhere in actual is a mismatch)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if actual.shape != expected.shape:
        return math.inf, False
    finite = torch.isfinite(expected)
    same_nonfinite = bool(torch.equal(actual[~finite], expected[~finite])
                          and torch.isfinite(actual[finite]).all())
    diff = (actual[finite] - expected[finite]).norm()
    scale = expected[finite].norm()
    error = float(diff / scale) if scale > 0 else float(diff)
    return error, same_nonfinite


def _sdpa_path_errors(inputs, ref, case, dtype, backend):
    """Relative errors of dilated_attention (out and gradients) against the
    oracle's references, in `dtype` under `backend` (None: SDPA's choice)."""
    leaves = [inputs[x].detach().to(dtype).requires_grad_()
              for x in ("q", "k", "v")]
    if case["pattern"] == "dense":
        segs, rates = [case["n"]], [1]
    else:
        segs, rates = case["segment_lengths"], case["dilation_rates"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA's reasons for refusing a backend
        with backend_context(backend) if backend else contextlib.nullcontext():
            out = dilated_attention(*leaves, segs, rates, case["causal"])
            out.backward(inputs["grad_out"].to(dtype))
    got = {"out": out.detach(), "grad_q": leaves[0].grad,
           "grad_k": leaves[1].grad, "grad_v": leaves[2].grad}
    return {name: relative_error(t, ref[name])[0] for name, t in got.items()}


def cmd_check(args):
    from safetensors.torch import save_file
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    os.makedirs(args.dir, exist_ok=True)
    print(f"check: cases in {args.dir}, inputs seed {seed}, oracle on {device}")
    generator = torch.Generator().manual_seed(seed)
    manifest = []
    failures = 0
    for case in CHECK_CASES:
        if case.get("cuda_only") and device != "cuda":
            print(f"  {case['name']}: skipped (needs CUDA for its n^2 oracle)")
            continue
        shape = (case["batch"], case["n"], case["heads"], case["head_dim"])
        inputs = {name: torch.randn(shape, generator=generator)
                  for name in ("q", "k", "v", "grad_out")}
        started = time.time()
        on_device = {name: t.to(device) for name, t in inputs.items()}
        ref = oracle_attention(on_device["q"], on_device["k"], on_device["v"],
                               on_device["grad_out"], case_patterns(case),
                               case["causal"])
        seconds = time.time() - started
        stem = os.path.join(args.dir, case["name"])
        save_file(inputs, stem + ".in.safetensors")
        save_file({name: t.cpu().contiguous() for name, t in ref.items()},
                  stem + ".ref.safetensors")
        entry = {key: value for key, value in case.items()
                 if key != "cuda_only"}
        entry["cli_flags"] = case_cli_flags(case)
        manifest.append(entry)
        # This file's SDPA path against the oracle: float64 (exact up to
        # reassociation), and bf16 with each fused backend on CUDA.
        notes = []
        if case["pattern"] == "dilated" and case["head_layout"] == "all_heads":
            notes.append("no SDPA path for all_heads (the oracle only)")
        else:
            variants = [("float64", None)]
            if device == "cuda":
                variants += [("bfloat16", b)
                             for b in ("flash", "efficient", "cudnn")]
            for dtype_name, backend in variants:
                tol = TOLERANCES[dtype_name]
                try:
                    errors = _sdpa_path_errors(
                        on_device, ref, case, getattr(torch, dtype_name),
                        backend)
                except RuntimeError as error:
                    notes.append(f"sdpa {dtype_name} {backend}: unavailable "
                                 f"({str(error).splitlines()[0][:80]})")
                    continue
                worst = max(errors.values())
                ok = worst <= tol
                failures += not ok
                label = f"{dtype_name} {backend or 'default'}"
                notes.append(f"sdpa {label} max rel err {worst:.2e} "
                             f"{'PASS' if ok else 'FAIL'} (tol {tol:g})")
        print(f"  {case['name']}: q {list(shape)}, oracle {seconds:.1f} s; "
              + "; ".join(notes), flush=True)
    with open(os.path.join(args.dir, "cases.json"), "w") as f:
        json.dump({"seed": seed, "cases": manifest}, f, indent=1)
    print(f"wrote {len(manifest)} cases and cases.json to {args.dir}; run "
          f"ours on each with\n  attention_cli --input={args.dir}/CASE"
          f".in.safetensors --output={args.dir}/CASE.DEVICE_DTYPE"
          f".safetensors CLI_FLAGS --device=DEVICE --dtype=DTYPE\nor let "
          f"`compare --cli=PATH` do it")
    if failures:
        print(f"check: {failures} SDPA-path comparisons FAILED")
        sys.exit(1)


def cmd_compare(args):
    from safetensors.torch import load_file
    with open(os.path.join(args.dir, "cases.json")) as f:
        manifest = json.load(f)
    tol = args.tol if args.tol is not None else TOLERANCES[args.dtype]
    tag = f"{args.device}_{args.dtype}"
    print(f"compare: attention_cli --device={args.device} --dtype={args.dtype}"
          f" against float64 references, tolerance {tol:g} on "
          f"||ours - ref|| / ||ref||")
    failed = 0
    for case in manifest["cases"]:
        if args.cases and case["name"] not in args.cases:
            continue
        stem = os.path.join(args.dir, case["name"])
        ours_path = f"{stem}.{tag}.safetensors"
        if args.cli:
            command = [args.cli, f"--input={stem}.in.safetensors",
                       f"--output={ours_path}", *case["cli_flags"],
                       f"--device={args.device}", f"--dtype={args.dtype}"]
            started = time.time()
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                failed += 1
                print(f"  {case['name']}: FAIL: attention_cli exited "
                      f"{done.returncode}: {done.stderr.strip()[:400]}")
                continue
            wall = f", cli {time.time() - started:.1f} s"
        else:
            wall = ""
        if not os.path.exists(ours_path):
            failed += 1
            print(f"  {case['name']}: FAIL: no {ours_path}")
            continue
        ours = load_file(ours_path)
        ref = load_file(f"{stem}.ref.safetensors")
        parts, ok = [], True
        for name in ("out", "lse", "grad_q", "grad_k", "grad_v"):
            if name not in ours:
                parts.append(f"{name} missing")
                ok = False
                continue
            error, same = relative_error(ours[name], ref[name])
            good = error <= tol and same
            ok &= good
            parts.append(f"{name} {error:.2e}"
                         + ("" if same else " (non-finite entries differ)"))
        failed += not ok
        print(f"  {case['name']}: {'PASS' if ok else 'FAIL'}: "
              + ", ".join(parts) + wall, flush=True)
    print(f"compare: {'all PASS' if not failed else f'{failed} FAILED'}")
    sys.exit(1 if failed else 0)


# ----------------------------------------------------------------------------
# selftest


def cmd_selftest(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    worst = 0.0
    assert head_group_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert head_group_ranges(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert head_patterns(3, [4, 8], [1, 2], "all_heads")[1] == [
        (4, 1, 0), (8, 2, 1)]
    # The oracle against plain loops over (t, u).
    for _ in range(args.trials // 4):
        n, heads = rng.randint(1, 12), rng.randint(1, 3)
        groups = rng.randint(1, 3)
        segs = [rng.randint(1, n + 3) for _ in range(groups)]
        rates = [rng.randint(1, 4) for _ in range(groups)]
        layout = rng.choice(["head_groups", "all_heads"])
        causal = rng.random() < 0.5
        q, k, v = (torch.randn(2, n, heads, 4, dtype=torch.float64)
                   for _ in range(3))
        patterns = head_patterns(heads, segs, rates, layout)
        ref = oracle_attention(q, k, v, None, patterns, causal)
        out, lse = _loop_oracle(q, k, v, patterns, causal)
        for got, want in ((ref["out"], out), (ref["lse"], lse)):
            error, same = relative_error(got, want)
            assert same and error < 1e-12, (
                n, segs, rates, layout, causal, error)
            worst = max(worst, error)
    # The SDPA path against the oracle, forward and gradients, float64.
    for _ in range(args.trials):
        n = rng.choice([1, 2, 7, 13, 40, 64, 100, 129])
        heads, groups = rng.randint(1, 5), rng.randint(1, 3)
        segs = [rng.randint(1, n + 5) for _ in range(groups)]
        rates = [rng.randint(1, 5) for _ in range(groups)]
        causal = rng.random() < 0.5
        d = rng.choice([8, 16])
        q, k, v, grad_out = (
            torch.randn(2, n, heads, d, dtype=torch.float64, device=device)
            for _ in range(4))
        ref = oracle_attention(q, k, v, grad_out,
                               head_patterns(heads, segs, rates,
                                             "head_groups"), causal)
        case = dict(pattern="dilated", segment_lengths=segs,
                    dilation_rates=rates, causal=causal, n=n)
        errors = _sdpa_path_errors(
            {"q": q, "k": k, "v": v, "grad_out": grad_out}, ref, case,
            torch.float64, None)
        assert max(errors.values()) < 1e-10, (n, heads, segs, rates, causal,
                                              errors)
        worst = max([worst, *errors.values()])
    # Allowed-pair counts against the oracle's masks.
    for n, w, r, o, causal in [(4133, 512, 1, 0, False),
                               (4133, 1024, 2, 1, True), (50, 8, 4, 3, True),
                               (10, 3, 5, 4, False)]:
        count = _pair_counts(n, [(w, r, o)], causal, "cpu")
        assert int(count.sum()) == selected_pairs(n, w, r, o, causal), (n, w)
    print(f"selftest: PASS on {device} ({args.trials // 4} loop-oracle and "
          f"{args.trials} SDPA-path trials, worst relative error "
          f"{worst:.1e})")


# ----------------------------------------------------------------------------


def int_list(text):
    return [int(x) for x in text.split(",") if x]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)

    bench = sub.add_parser("bench", help="time workloads 1 and 2 (CUDA)")
    bench.add_argument("--json", help="file to write every number to")
    bench.add_argument("--workloads", type=lambda s: s.split(","),
                       default=["dilated", "dense"])
    bench.add_argument("--lengths", type=int_list, default=[131072, 1048576])
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--heads", type=int, default=12)
    bench.add_argument("--head_dim", type=int, default=64)
    bench.add_argument("--segment_lengths", type=int_list,
                       default=[2048, 4096, 8192])
    bench.add_argument("--dilation_rates", type=int_list, default=[1, 2, 4])
    bench.add_argument("--dense_n", type=int, default=16384)
    bench.add_argument("--dense_batch", type=int, default=1)
    bench.add_argument("--dense_heads", type=int, default=16)
    bench.add_argument("--dense_head_dim", type=int, default=128)
    bench.add_argument("--backends", type=lambda s: s.split(","),
                       default=["flash", "efficient", "cudnn"],
                       help="SDPA backends to try (flash, efficient, cudnn, "
                            "math)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--repeats", type=int, default=10)

    check = sub.add_parser("check", help="write inputs and references")
    check.add_argument("--dir", default="/tmp/attention_check")
    check.add_argument("--device", choices=["cpu", "cuda"],
                       help="where the oracle runs (default: cuda if present)")
    check.add_argument("--seed", type=int, help="default: a fresh one")

    compare = sub.add_parser("compare", help="check attention_cli's outputs")
    compare.add_argument("--dir", default="/tmp/attention_check")
    compare.add_argument("--cli", help="attention_cli to run on each case")
    compare.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    compare.add_argument("--dtype", default="float32",
                         choices=sorted(TOLERANCES))
    compare.add_argument("--tol", type=float,
                         help="override the dtype's tolerance")
    compare.add_argument("--cases", type=lambda s: s.split(","),
                         help="only these case names")

    selftest = sub.add_parser("selftest", help="SDPA path vs oracle, tiny")
    selftest.add_argument("--device", choices=["cpu", "cuda"])
    selftest.add_argument("--trials", type=int, default=200)
    selftest.add_argument("--seed", type=int, default=0)

    args = parser.parse_args()
    {"bench": cmd_bench, "check": cmd_check, "compare": cmd_compare,
     "selftest": cmd_selftest}[args.mode](args)


if __name__ == "__main__":
    main()
