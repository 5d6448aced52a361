#!/usr/bin/env python3
"""PyTorch yardstick for the project's training step (issue 7, Performance,
workload 3). A baseline to measure against only: nothing in the project
imports or needs it, and it needs torch, which the project does not.

The model is models/transformer_lm's, written in PyTorch: token embedding,
pre-norm blocks x + attn(norm1(x)), then x + fc2(gelu(fc1(norm2(x)))) with
LayerNorm (eps 1e-5, with bias) or RMSNorm (eps 1e-6), q/k/v/out projections
with biases, rotary positions (half-split pairs, base 10000, global
positions) on q and k, causal dilated attention in the head-groups layout
(attention/pytorch_dilated_baseline.py's SDPA-per-head-group path), exact
GELU, residual dropout, a final norm and a tied (or untied) output head; the
same initialization scheme. Training: mean next-token cross-entropy, global
gradient-norm clipping at 1.0 and torch.optim.AdamW (betas 0.9, 0.999, eps
1e-8, weight decay 0.01 on matrices only, like train/optimizer.h's
defaults; fused), at a constant learning rate of 3e-3 (the peak of our
schedule), under bf16 autocast with float32 master weights.

Modes (python3 train/pytorch_train_baseline.py MODE --help):
  bench        median time of full training steps at n = 65536 (issue 7's
               workload 3: 6 layers, d_model 512, 8 heads, vocab 256, batch
               1, segments 2048,4096,8192, rates 1,2,4), without and with
               torch.utils.checkpoint around every block; tokens/s and peak
               memory (max_memory_allocated over the timed steps, weights and
               optimizer state included). About 10-20 s on an H200.
                 python3 train/pytorch_train_baseline.py bench \\
                     --json=$OUT/torch_train.json
  max_context  for each of --lengths in turn, one training step of a fresh
               model, without and with recomputation, until the first that
               runs out of memory (torch.cuda.OutOfMemoryError); reports the
               longest n that trained. About 1-2 minutes on an H200.
                 python3 train/pytorch_train_baseline.py max_context \\
                     --json=$OUT/torch_max_context.json
Both print a table and write every number to --json. CUDA only.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "attention"))
from pytorch_dilated_baseline import (  # noqa: E402
    backend_context, dilated_attention)

DEVICE = "cuda"


def rotary_tables(n, head_dim, base, device):
    """float32 cos and sin [n, 1, head_dim / 2] of angle[t, i] = t *
    base^(-2i / head_dim), computed in float64 as ops/rope.h does."""
    half = head_dim // 2
    inv_freq = base ** (-2 * torch.arange(half, dtype=torch.float64,
                                          device=device) / head_dim)
    angle = (torch.arange(n, dtype=torch.float64, device=device)[:, None]
             * inv_freq[None, :])
    return angle.cos().float()[:, None], angle.sin().float()[:, None]


def apply_rotary(x, cos, sin):
    """x [batch, n, heads, head_dim], pairs (x_i, x_{i + head_dim / 2})."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def xavier_projection(d_model):
    linear = nn.Linear(d_model, d_model)
    nn.init.xavier_normal_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class Attention(nn.Module):
    """q/k/v/out projections around rotary positions and causal dilated
    attention (attention/multihead_attention.h's MultiheadDilatedAttention)."""

    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        self.segments = config.segment_lengths
        self.rates = config.dilation_rates
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            xavier_projection(config.d_model) for _ in range(4))

    def forward(self, x, cos, sin):
        batch, n, d = x.shape
        shape = (batch, n, self.heads, d // self.heads)
        q = apply_rotary(self.q_proj(x).view(shape), cos, sin)
        k = apply_rotary(self.k_proj(x).view(shape), cos, sin)
        v = self.v_proj(x).view(shape)
        a = dilated_attention(q, k, v, self.segments, self.rates, causal=True)
        return self.out_proj(a.reshape(batch, n, d))


class Mlp(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_hidden or 4 * config.d_model
        self.fc1 = nn.Linear(config.d_model, hidden)
        self.fc2 = nn.Linear(hidden, config.d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=1e-6)
    return nn.LayerNorm(config.d_model, eps=1e-5)


class Block(nn.Module):
    """x + drop(attn(norm1(x))), then x + drop(mlp(norm2(x)))."""

    def __init__(self, config):
        super().__init__()
        self.dropout = config.dropout
        self.norm1, self.attn = make_norm(config), Attention(config)
        self.norm2, self.mlp = make_norm(config), Mlp(config)

    def forward(self, x, cos, sin):
        a = self.attn(self.norm1(x), cos, sin)
        x = x + F.dropout(a, self.dropout, self.training)
        m = self.mlp(self.norm2(x))
        return x + F.dropout(m, self.dropout, self.training)


class TransformerLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.final_norm = make_norm(config)
        self.lm_head = None
        if not config.tied:
            self.lm_head = nn.Linear(config.d_model, config.vocab, bias=False)
            nn.init.normal_(self.lm_head.weight, std=0.02)

    def forward(self, tokens, recompute):
        n = tokens.shape[1]
        cos, sin = rotary_tables(n, self.config.d_model // self.config.heads,
                                 self.config.rope_base, tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin)
        x = self.final_norm(x)
        head = (self.embed.weight if self.lm_head is None
                else self.lm_head.weight)
        return F.linear(x, head)


def make_optimizer(model, config):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
        fused=config.adamw == "fused", foreach=config.adamw == "foreach")


def train_step(model, optimizer, tokens, targets, config, recompute):
    """One full step: forward under bf16 autocast, backward, clipping, AdamW;
    returns the loss as a tensor (no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    backend = (backend_context(config.sdpa_backend) if config.sdpa_backend
               else contextlib.nullcontext())
    with backend:  # also over backward, where recomputed blocks rerun
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logits = model(tokens, recompute)
            loss = F.cross_entropy(logits.flatten(0, 1).float(),
                                   targets.flatten())
        loss.backward()
    if config.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
    optimizer.step()
    return loss.detach()


def make_batch(config, n):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    data = torch.randint(0, config.vocab, (config.batch, n + 1), device=DEVICE,
                         generator=generator)
    return data[:, :-1], data[:, 1:]


def build(config):
    torch.manual_seed(0)
    model = TransformerLM(config).to(DEVICE).train()
    return model, make_optimizer(model, config)


def model_config_json(config):
    keys = ("layers", "d_model", "heads", "vocab", "batch", "mlp_hidden",
            "norm", "tied", "dropout", "rope_base", "segment_lengths",
            "dilation_rates", "lr", "weight_decay", "clip", "adamw",
            "sdpa_backend")
    return {key: getattr(config, key) for key in keys}


def environment():
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "memory_bytes": props.total_memory,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def bench(config):
    rows = []
    n = config.n
    print(f"{'recompute':>9} {'n':>8} {'ms/step':>9} {'tokens/s':>10} "
          f"{'peak GiB':>8} {'loss':>7}")
    for recompute in config.recompute:
        model, optimizer = build(config)
        tokens, targets = make_batch(config, n)
        for _ in range(config.warmup):
            train_step(model, optimizer, tokens, targets, config, recompute)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(config.repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            loss = train_step(model, optimizer, tokens, targets, config,
                              recompute)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        row = {"recompute": recompute, "n": n, "ms_per_step": ms,
               "step_ms": times,
               "tokens_per_s": config.batch * n / (ms / 1e3),
               "peak_bytes": torch.cuda.max_memory_allocated(),
               "parameters": sum(p.numel() for p in model.parameters()),
               "loss": float(loss)}
        rows.append(row)
        print(f"{recompute!s:>9} {n:>8} {ms:>9.2f} "
              f"{row['tokens_per_s']:>10.4g} "
              f"{row['peak_bytes'] / 2**30:>8.2f} {row['loss']:>7.3f}",
              flush=True)
        del model, optimizer, tokens, targets, loss
        gc.collect()
        torch.cuda.empty_cache()
    return {"bench": rows}


def try_one_step(config, n, recompute):
    """Trains one step of a fresh model at n tokens: (ok, note, peak bytes,
    seconds). Out of memory is ok=False; so is any other error, named."""
    started = time.time()
    torch.cuda.reset_peak_memory_stats()
    try:
        model, optimizer = build(config)
        tokens, targets = make_batch(config, n)
        loss = float(train_step(model, optimizer, tokens, targets, config,
                                recompute))
        torch.cuda.synchronize()
        ok, note = math.isfinite(loss), f"loss {loss:.3f}"
    except torch.cuda.OutOfMemoryError:
        ok, note = False, "out of memory"
    except RuntimeError as error:  # e.g. a size a kernel does not take
        ok, note = False, f"error: {str(error).splitlines()[0][:300]}"
    peak = torch.cuda.max_memory_allocated()
    return ok, note, peak, time.time() - started


def max_context(config):
    results = []
    print(f"{'recompute':>9} {'n':>8} {'result':<14} {'peak GiB':>8} "
          f"{'seconds':>7}")
    for recompute in config.recompute:
        tries, largest = [], None
        for n in config.lengths:
            ok, note, peak, seconds = try_one_step(config, n, recompute)
            # The failed step's tensors die with its frame; free the cache
            # so that the next size starts from an empty device.
            gc.collect()
            torch.cuda.empty_cache()
            tries.append({"n": n, "ok": ok, "note": note, "peak_bytes": peak,
                          "seconds": seconds})
            print(f"{recompute!s:>9} {n:>8} {note:<14.60} "
                  f"{peak / 2**30:>8.2f} {seconds:>7.1f}", flush=True)
            if not ok:
                break
            largest = n
        results.append({"recompute": recompute, "largest_n": largest,
                        "tries": tries})
        print(f"recompute={recompute}: longest n that trained: {largest}")
    return {"max_context": results}


def int_list(text):
    return [int(x) for x in text.split(",") if x]


def bool_list(text):
    return [{"on": True, "off": False}[x] for x in text.split(",")]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["bench", "max_context"])
    parser.add_argument("--json", help="file to write every number to")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mlp_hidden", type=int, default=0,
                        help="0: 4 * d_model")
    parser.add_argument("--norm", choices=["layernorm", "rmsnorm"],
                        default="layernorm")
    parser.add_argument("--tied", type=lambda s: s == "true", default=True,
                        help="true or false")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--rope_base", type=float, default=10000.0)
    parser.add_argument("--segment_lengths", type=int_list,
                        default=[2048, 4096, 8192])
    parser.add_argument("--dilation_rates", type=int_list, default=[1, 2, 4])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--adamw", choices=["fused", "foreach"],
                        default="fused")
    parser.add_argument("--sdpa_backend",
                        choices=["flash", "efficient", "cudnn"],
                        help="only this SDPA backend (default: SDPA's choice)")
    parser.add_argument("--recompute", type=bool_list, default=[False, True],
                        help="off, on or off,on: without and/or with "
                             "recomputation (torch.utils.checkpoint) "
                             "around every block")
    parser.add_argument("--n", type=int, default=65536, help="bench: tokens")
    parser.add_argument("--warmup", type=int, default=2, help="bench")
    parser.add_argument("--repeats", type=int, default=5, help="bench")
    parser.add_argument(
        "--lengths", type=int_list,
        default=[131072, 262144, 524288, 786432, 1048576, 2097152, 4194304,
                 8388608],
        help="max_context: sizes tried in order, up to the first failure")
    config = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"{config.mode}: no CUDA device (expected a GPU)")
    if config.d_model % config.heads or (config.d_model // config.heads) % 2:
        sys.exit(f"d_model {config.d_model} and heads {config.heads}: "
                 "expected heads dividing d_model and an even head_dim")
    started = time.time()
    report = {"environment": environment(), "mode": config.mode,
              "model": model_config_json(config)}
    print(f"PyTorch {torch.__version__} on {report['environment']['device']}: "
          f"{config.layers} layers, d_model {config.d_model}, {config.heads} "
          f"heads, vocab {config.vocab}, batch {config.batch}, causal dilated "
          f"attention segments {config.segment_lengths} rates "
          f"{config.dilation_rates} (head groups), bf16 autocast, "
          f"{config.adamw} AdamW, clip {config.clip}")
    if config.mode == "bench":
        print(f"median of {config.repeats} steps after {config.warmup} "
              "warm-up steps")
        report.update(bench(config), warmup=config.warmup,
                      repeats=config.repeats)
    else:
        report.update(max_context(config))
    report["seconds"] = time.time() - started
    print(f"{config.mode} took {report['seconds']:.1f} s")
    if config.json:
        with open(config.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {config.json}")


if __name__ == "__main__":
    main()
