#!/usr/bin/env python3
"""Reads a CUPTI timeline (scripts/probes/cupti_trace.cpp's CSV) of an alloy_mlp or alloy_gpt2 run and says where
each step's wall time went on the device: busy (kernels, copies) or idle, and for every idle gap whether the host had
not yet issued the next operation (host late: the launch call ended after the device went idle) or had issued it and
the device waited on a dependency (an event, a copy). Steps are cut at each launch of the kernel named by the second
argument (a regular expression: the first kernel of a step); the first `skip` steps are warm-up.

  python3 scripts/trace_table.py trace.csv 'FusedUpdate' [skip=2 [top=25]]
"""
import bisect
import csv
import re
import sys
from collections import defaultdict


def short(name):
    name = re.sub(r"^void ", "", name)
    base = re.sub(r"[<(].*", "", name)
    m = re.search(r"(?:detail::)?([A-Z][A-Za-z]+)<", name)
    if "for_each" in base and m:
        base += "[" + m.group(1) + "]"
    return base.split("::")[-1][:60] if "nvjet" not in base else "nvjet (cuBLASLt product)"


def union_length(intervals):
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def main(path, marker, skip=2, top=25):
    device, host = [], []
    with open(path) as f:
        for r in csv.DictReader(f):
            row = (int(r["start"]), int(r["end"]), r["kind"], r["name"], int(r["stream"]), int(r["correlation"]),
                   int(r["bytes"]))
            (device if r["kind"] in ("kernel", "memcpy", "memset") else host).append(row)
    device.sort()
    host.sort()
    launch = {h[5]: h for h in host if h[2] == "runtime"}
    starts = [d[0] for d in device if d[2] == "kernel" and re.search(marker, d[3])]
    if len(starts) < skip + 2:
        print(f"{len(starts)} steps found by '{marker}': need at least {skip + 2}")
        return 1
    host_starts = [h[0] for h in host]
    totals = defaultdict(float)
    gap_names = defaultdict(lambda: [0, 0.0])
    by_kernel = defaultdict(lambda: [0, 0.0])
    syncs = defaultdict(lambda: [0, 0.0])
    steps = 0
    for a, b in zip(starts[skip:], starts[skip + 1:]):
        ops = [d for d in device if a <= d[0] < b]
        wall = b - a
        busy = union_length([(max(d[0], a), min(d[1], b)) for d in ops])
        kernels = union_length([(d[0], min(d[1], b)) for d in ops if d[2] == "kernel"])
        kernel_sum = sum(min(d[1], b) - d[0] for d in ops if d[2] == "kernel")
        copies = union_length([(d[0], min(d[1], b)) for d in ops if d[2] != "kernel"])
        late = waited = 0
        end = a
        following = [d for d in device if d[0] >= b][:1]  # the next step's first operation closes the last gap
        for d in ops + following:
            if d[0] > end + 1000:  # an idle gap over 1 us before d
                gap = d[0] - end
                l = launch.get(d[5])
                if l and l[1] > end + 1000:
                    late += gap
                    key = "host late before " + short(d[3])
                else:
                    waited += gap
                    key = "waited before " + short(d[3])
                gap_names[key][0] += 1
                gap_names[key][1] += gap
            end = max(end, min(d[1], b))
        i = bisect.bisect_left(host_starts, a)
        while i < len(host) and host[i][0] < b:
            h = host[i]
            if h[2] == "sync" or re.search(r"Synchronize", h[3]):
                syncs[h[3]][0] += 1
                syncs[h[3]][1] += h[1] - h[0]
            i += 1
        for d in ops:
            key = short(d[3]) if d[2] == "kernel" else d[2] + " " + d[3]
            by_kernel[key][0] += 1
            by_kernel[key][1] += min(d[1], b) - d[0]
        n_kernels = sum(1 for d in ops if d[2] == "kernel")
        for k, v in (("wall", wall), ("busy", busy), ("kernels", kernels), ("kernel_sum", kernel_sum),
                     ("copies", copies), ("idle", wall - busy), ("late", late), ("waited", waited),
                     ("n_kernels", n_kernels)):
            totals[k] += v
        steps += 1
    ms = lambda ns: ns / steps / 1e6
    print(f"{steps} steps after {skip} warm-up, cut at '{marker}'; per step, mean:")
    print(f"| wall | device busy | kernels (union) | kernel time (sum) | copies | idle | idle, host late | "
          f"idle, waiting | kernels |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {ms(totals['wall']):.3f} ms | {ms(totals['busy']):.3f} | {ms(totals['kernels']):.3f} | "
          f"{ms(totals['kernel_sum']):.3f} | {ms(totals['copies']):.3f} | {ms(totals['idle']):.3f} | "
          f"{ms(totals['late']):.3f} | {ms(totals['waited']):.3f} | {totals['n_kernels'] / steps:.0f} |")
    print("\ndevice operations by time (per step):")
    for key, (n, t) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:int(top)]:
        print(f"  {t / steps / 1e3:8.1f} us  {n / steps:5.1f} x  {key}")
    print("\nidle gaps over 1 us, by the operation after them (per step):")
    for key, (n, t) in sorted(gap_names.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"  {t / steps / 1e3:8.1f} us  {n / steps:5.1f} gaps  {key}")
    print("\nhost synchronizations (per step):")
    for key, (n, t) in sorted(syncs.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"  {t / steps / 1e3:8.1f} us  {n / steps:5.1f} calls  {key}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], *[int(a) for a in sys.argv[3:5]]))
