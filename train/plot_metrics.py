#!/usr/bin/python3
"""Plots a training metrics file (JSONL written by `bazel run //train --
--metrics=FILE`) to a PNG: the training loss and learning rate over steps,
and the evaluation metric (accuracy overall and by distance, with chance, for
synthetic tasks; held-out bits per byte for text).

Usage: python3 train/plot_metrics.py METRICS.jsonl [OUT.png]
Needs Debian's python3-matplotlib; draws with the Agg backend (no display).
A resumed run drops the records after its checkpoint and writes a "resume"
record, drawn as a dotted vertical line; in files of older versions, records
of a step written twice (before the interruption and again after resuming)
keep the later one. A number that was not finite (NaN, a diverging run) is
null in the file and leaves a gap in its curve.
"""

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def as_float(value):
    """A metrics number; null (None) becomes NaN, which matplotlib skips."""
    return math.nan if value is None else value


def read_records(path):
    train, evals, resumes = {}, {}, set()
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{number}: not JSON ({e})")
            kind = record.get("kind")
            if kind == "train":
                train[record["step"]] = record
            elif kind == "eval":
                evals[record["step"]] = record
            elif kind == "resume":
                resumes.add(record["step"])
    return ([train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)],
            sorted(resumes))


def main(argv):
    if len(argv) not in (2, 3):
        raise SystemExit(__doc__)
    path = argv[1]
    out = argv[2] if len(argv) == 3 else path.rsplit(".", 1)[0] + ".png"
    train, evals, resumes = read_records(path)
    if not train and not evals:
        raise SystemExit(f"{path}: no train or eval records")

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [as_float(r["loss"]) for r in train],
                     color="tab:blue", label="training loss")
        for i, step in enumerate(resumes):
            ax_loss.axvline(step, color="tab:green", linestyle=":",
                            label="_nolegend_" if i else "resumed")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss (nats per scored token)")
        chance = evals[-1].get("chance") if evals else None
        if chance:
            ax_loss.axhline(-math.log(chance), color="tab:red", linestyle=":",
                            label=f"ln {1 / chance:.0f}: guessing among the "
                                  "possible answers")
        ax_loss.set_ylim(bottom=0)
        ax_loss.grid(True, alpha=0.3)
        ax_lr = ax_loss.twinx()
        ax_lr.plot(steps, [as_float(r["lr"]) for r in train], color="tab:gray",
                   linestyle=":", label="learning rate")
        ax_lr.set_ylabel("learning rate")
        lines = [l for l in ax_loss.get_lines() + ax_lr.get_lines()
                 if not l.get_label().startswith("_")]
        ax_loss.legend(lines, [l.get_label() for l in lines], loc="upper right")
        ax_loss.set_title("training")

    synthetic = any(r.get("accuracy") is not None for r in evals)
    if evals and synthetic:
        steps = [r["step"] for r in evals]
        ax_eval.plot(steps, [100 * as_float(r["accuracy"]) for r in evals], "o-",
                     color="black", linewidth=2, label="all distances")
        buckets = evals[-1].get("accuracy_by_distance", [])
        colors = plt.cm.viridis([i / max(1, len(buckets) - 1)
                                 for i in range(len(buckets))])
        for i, bucket in enumerate(buckets):
            ys = []
            for r in evals:
                match = [b for b in r.get("accuracy_by_distance", [])
                         if b["min"] == bucket["min"] and b["max"] == bucket["max"]]
                ys.append(100 * as_float(match[0]["accuracy"]) if match
                          else math.nan)
            ax_eval.plot(steps, ys, ".--", color=colors[i],
                         label=f"distance {bucket['min']}-{bucket['max']}")
        chance = evals[-1].get("chance")
        if chance:
            ax_eval.axhline(100 * chance, color="tab:red", linestyle=":",
                            label=f"chance {100 * chance:.1f}%")
        ax_eval.set_ylim(-2, 102)
        ax_eval.set_ylabel("evaluation accuracy (%)")
        ax_eval.set_title("evaluation: answer accuracy by evidence distance")
        ax_eval.legend(loc="center right", fontsize="small")
    elif evals:
        steps = [r["step"] for r in evals]
        ax_eval.plot(steps, [as_float(r["loss"]) / math.log(2) for r in evals],
                     "o-", color="black")
        ax_eval.set_ylabel("held-out bits per byte")
        ax_eval.set_title("evaluation")
    ax_eval.set_xlabel("step")
    ax_eval.grid(True, alpha=0.3)

    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv)
