#!/usr/bin/env python3
"""Reads ncu's CSV (--metrics gpu__time_duration.sum --csv) of an alloy_mlp or alloy_gpt2 run of S
steps (each step launches the same kernels) and prints the last whole step's kernels: per phase (forward: up to the
loss kernel; backward: up to the first optimizer kernel; optimizer: the rest) and per kernel."""
import csv
import re
import sys
from collections import OrderedDict, defaultdict


def short(name):
    name = re.sub(r"\(.*", "", name) if name.startswith("void ") else name
    name = name.replace("void ", "")
    base = re.sub(r"<.*", "", name)
    # keep the functor of for_each kernels: it names the element-wise operation
    m = re.search(r"(alloy::[A-Za-z_:]*detail::)?([A-Z][A-Za-z]+)<", name)
    if "for_each" in base and m:
        base += "[" + m.group(2) + "]"
    return base[:90]


def main(path, steps=None, start="FromFloat"):
    rows = []
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            rows.append((int(r["ID"]), r["Kernel Name"], float(r["Metric Value"].replace(",", ""))))
    rows.sort()
    if not rows:
        print("no kernels profiled")
        return 1
    steps = steps or 3
    # A step starts with its first kernel: the input conversion (FromFloat) for the residual MLP,
    # the embedding's forward (embedding_forward) for GPT-2. The first step also runs the
    # initialization kernels, so slice at the last two starts rather than by count.
    starts = [i for i, r in enumerate(rows) if re.search(start, short(r[1]))]
    if len(starts) >= 2:
        last = rows[starts[-2]:starts[-1]]
    else:
        last = rows[len(rows) - len(rows) // steps:]
    per = len(last)
    phase = "forward"
    phases = OrderedDict((p, 0.0) for p in ("forward", "backward", "optimizer"))
    kernels = defaultdict(lambda: [0, 0.0, ""])
    for _, name, ns in last:
        s = short(name)
        if phase == "forward" and re.search("softmax|cross_entropy", s, re.I):
            phase = "backward"
        elif phase == "backward" and re.search(r"AccumulateGrads|grad_stats|GradStats|stats|fused_update|FusedUpdate|reduce_partials|adam", s,
                                               re.I):
            phase = "optimizer"
        phases[phase] += ns
        k = kernels[s]
        k[0] += 1
        k[1] += ns
        k[2] = k[2] or phase
    total = sum(phases.values())
    print(f"kernels per step: {per} ({len(rows)} profiled over {steps} steps); kernel time {total / 1e6:.3f} ms "
          "(ncu runs each kernel alone, caches flushed: more than in a real step)")
    for p, ns in phases.items():
        print(f"  {p:10s} {ns / 1e6:8.3f} ms  {100 * ns / total:5.1f}%")
    print(f"{'kernel':90s} {'phase':9s} {'n':>4s} {'ms':>8s} {'%':>6s}")
    for s, (n, ns, p) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        print(f"{s:90s} {p:9s} {n:4d} {ns / 1e6:8.3f} {100 * ns / total:6.1f}")
    return 0


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # | head
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None,
                  sys.argv[3] if len(sys.argv) > 3 else "FromFloat"))
