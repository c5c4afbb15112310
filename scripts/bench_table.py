#!/usr/bin/env python3
"""Turns Google Benchmark JSON files into one markdown table of medians, with each row's
bandwidth and its ratio to the device-to-device copy measured in the same run."""
import json
import sys

COPY = "BM_MemcpyDeviceToDevice"


def medians(path):
    with open(path) as f:
        data = json.load(f)
    rows = {}
    for b in data["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        name = b["run_name"].split("/")[0]
        ms = b["real_time"] * {"ms": 1.0, "us": 1e-3, "ns": 1e-6, "s": 1e3}[b["time_unit"]]
        rows[name] = {"ms": ms, "bytes": b.get("bytes"), "extra": {k: v for k, v in b.items() if k.startswith("x_")}}
    return data.get("context", {}), rows


def main(paths):
    lines = ["| benchmark | median ms | TB/s | vs copy |", "| --- | --- | --- | --- |"]
    for path in paths:
        _, rows = medians(path)
        copy = rows.get(COPY)
        copy_tbs = copy["bytes"] / copy["ms"] / 1e9 if copy and copy["bytes"] else None
        for name, r in rows.items():
            tbs = r["bytes"] / r["ms"] / 1e9 if r["bytes"] else None
            ratio = f"{tbs / copy_tbs:.1%}" if tbs and copy_tbs else "-"
            lines.append(f"| {name} | {r['ms']:.3f} | {tbs:.2f} | {ratio} |" if tbs else f"| {name} | {r['ms']:.3f} | - | - |")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
