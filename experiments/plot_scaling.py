#!/usr/bin/python3
"""Plots the CSVs of `bazel run //experiments:scaling`: each
DIR/<experiment>.csv becomes DIR/<experiment>.png, drawn the way its
experiment needs (the file name says which experiment it is).

Usage: /usr/bin/python3 experiments/plot_scaling.py DIR/<experiment>.csv ...
Needs Debian's python3-matplotlib; draws with the Agg backend (no display).
"""

import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 1024 * 1024


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def memory_vs_ranks(rows, ax):
    ranks = [int(r["ranks"]) for r in rows]
    series = [("dilated_attention", "dilated attention (fwd+bwd)", "tab:blue"),
              ("dense_attention", "dense attention (fwd+bwd)", "tab:orange"),
              ("training_step", "training step", "tab:green")]
    for column, label, color in series:
        ax.plot(ranks, [int(r[column + "_bytes"]) / MIB for r in rows], "o-",
                color=color, label=label)
        ax.plot(ranks, [int(r[column + "_ideal_bytes"]) / MIB for r in rows],
                ":", color=color, label=f"{label}: ideal 1/k")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(k) for k in ranks])
    ax.set_xlabel("ranks k (thread ranks)")
    ax.set_ylabel("peak memory of the worst rank (MiB)")
    ax.set_title(f"memory per rank at fixed n = {int(rows[0]['n']):,}")
    ax.legend(fontsize="small")


def time_vs_length(rows, axes):
    ax_time, ax_memory = axes
    colors = {"dilated": "tab:blue", "block_sparse": "tab:purple",
              "dense": "tab:orange"}
    for attention in dict.fromkeys(r["attention"] for r in rows):
        mine = [r for r in rows if r["attention"] == attention]
        ns = [int(r["n"]) for r in mine]
        color = colors.get(attention)
        ax_time.plot(ns, [float(r["forward_backward_ms"]) for r in mine], "o-",
                     color=color, label=f"{attention} forward+backward")
        ax_time.plot(ns, [float(r["forward_ms"]) for r in mine], ".--",
                     color=color, alpha=0.6, label=f"{attention} forward")
        ax_memory.plot(ns, [int(r["peak_bytes"]) / MIB for r in mine], "o-",
                       color=color, label=attention)
    # Slopes 1 and 2 through the first point of the first type, for reference.
    n0, t0 = int(rows[0]["n"]), float(rows[0]["forward_backward_ms"])
    n_max = max(int(r["n"]) for r in rows)
    ax_time.plot([n0, n_max], [t0, t0 * n_max / n0], color="gray",
                 linestyle=":", label="slope 1 (linear)")
    dense = [r for r in rows if r["attention"] == "dense"]
    if dense:
        nd, td = int(dense[0]["n"]), float(dense[0]["forward_backward_ms"])
        nd_max = max(int(r["n"]) for r in dense)
        ax_time.plot([nd, nd_max], [td, td * (nd_max / nd) ** 2], color="black",
                     linestyle=":", label="slope 2 (quadratic)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.grid(True, which="both", alpha=0.3)
    ax_time.set_ylabel("time per call (ms)")
    ax_time.set_title("time against length, one rank (log-log)")
    ax_time.legend(fontsize="small")
    ax_memory.set_ylabel("peak memory of the call (MiB)")
    ax_memory.set_title("memory against length (no n x n tensor)")
    ax_memory.legend(fontsize="small")


def communication(rows, ax):
    for k in dict.fromkeys(int(r["ranks"]) for r in rows):
        mine = [r for r in rows if int(r["ranks"]) == k]
        rates = [int(r["dilation_rate"]) for r in mine]
        line, = ax.plot(rates,
                        [int(r["forward_backward_bytes"]) / MIB for r in mine],
                        "o", markersize=8, label=f"k = {k} measured")
        ax.plot(rates, [int(r["formula_bytes"]) / MIB for r in mine], "--",
                color=line.get_color(), label=f"k = {k} formula")
        ax.axhline(int(mine[0]["whole_chunk_bytes"]) / MIB,
                   color=line.get_color(), linestyle=":", alpha=0.5)
    rates = sorted({int(r["dilation_rate"]) for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(rates)
    ax.set_xticklabels([str(r) for r in rates])
    ax.set_xlabel("dilation rate r of the pattern (w = n, r)")
    ax.set_ylabel("bytes sent per rank per call, forward+backward (MiB)")
    ax.set_title("ring communication: 6 (k-1) heads n/(k r) batch head_dim 4 B"
                 "\n(dotted: whole chunks)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def max_context(rows, ax):
    ranks = list(dict.fromkeys(int(r["ranks"]) for r in rows))
    width = 0.38
    for i, (recompute, label) in enumerate([("0", "stored activations"),
                                            ("1", "recomputation (--recompute)")]):
        values = []
        for k in ranks:
            match = [r for r in rows
                     if int(r["ranks"]) == k and r["recompute"] == recompute]
            values.append(int(match[0]["max_context"]) if match else 0)
        xs = [j + (i - 0.5) * width for j in range(len(ranks))]
        bars = ax.bar(xs, values, width, label=label)
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:,}", (bar.get_x() + bar.get_width() / 2,
                                       bar.get_height()),
                        ha="center", va="bottom", fontsize="small")
    ax.set_xticks(range(len(ranks)))
    ax.set_xticklabels([f"k = {k}" for k in ranks])
    ax.set_ylabel("longest context of a training step (tokens)")
    budget = int(rows[0]["budget_bytes"]) / MIB
    ax.set_title(f"longest context in {budget:,.0f} MiB per rank")
    ax.legend()


def tile_order(rows, ax):
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    lengths = list(dict.fromkeys(int(r["n"]) for r in rows))
    width = 0.8 / len(lengths)
    for i, n in enumerate(lengths):
        values = []
        for p in patterns:
            match = [r for r in rows if r["pattern"] == p and int(r["n"]) == n
                     and r["tile_order"] == "hilbert"]
            values.append(float(match[0]["relative_to_row_major"]))
        xs = [j + (i - (len(lengths) - 1) / 2) * width
              for j in range(len(patterns))]
        bars = ax.bar(xs, values, width, label=f"n = {n:,}")
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.3f}", (bar.get_x() + bar.get_width() / 2,
                                         bar.get_height()),
                        ha="center", va="bottom", fontsize="small")
    ax.axhline(1, color="black", linewidth=1)
    ax.set_xticks(range(len(patterns)))
    ax.set_xticklabels(patterns)
    values = [float(r["relative_to_row_major"]) for r in rows]
    ax.set_ylim(min(values) - 0.05, max(values) + 0.05)
    ax.set_ylabel("Hilbert time / row-major time (forward+backward)")
    ax.set_title("block-sparse tile order: below 1, Hilbert order is faster")
    ax.legend()


PLOTS = {
    "memory_vs_ranks": (memory_vs_ranks, 1),
    "time_vs_length": (time_vs_length, 2),
    "communication": (communication, 1),
    "max_context": (max_context, 1),
    "tile_order": (tile_order, 1),
}


def plot(path):
    name = os.path.splitext(os.path.basename(path))[0]
    if name not in PLOTS:
        raise SystemExit(f"{path}: not a scaling experiment's CSV (expected "
                         f"one of {', '.join(PLOTS)}.csv)")
    rows = read_rows(path)
    if not rows:
        raise SystemExit(f"{path}: no rows")
    draw, panels = PLOTS[name]
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8))
    draw(rows, axes)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    for path in argv[1:]:
        plot(path)


if __name__ == "__main__":
    main(sys.argv)
