#!/usr/bin/env python3
"""PyTorch's side of the end-to-end residual-MLP comparison (../shared/PEERS.md): input 1024 ->
d 1024, 8 blocks of LayerNorm, Linear(d, 4d), GELU(tanh), Linear(4d, d), residual; final
LayerNorm, Linear(d, 1000), softmax cross-entropy; 8192 rows of random data; fused AdamW, clip
1.0, GradScaler for fp16. Times a whole training step (CUDA events, median of --repeats after
warm-up) and the peak allocated memory, for fp32, tf32, bf16 autocast, fp16 autocast +
GradScaler, and bf16 + checkpoint every block; a config ending in "_compile" runs the same model
under torch.compile (default mode). Prints JSON (--out) and a table."""
import argparse
import json
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x)), approximate="tanh"))


class Mlp(nn.Module):
    """Parameter names are alloy's (examples/mlp/residual_mlp.hpp declares embed.weight,
    blocks.0.norm.weight, ..., final_norm.bias, head.bias), so weights files load both ways
    (scripts/torch_weights_roundtrip.py)."""

    def __init__(self, inputs=1024, d=1024, blocks=8, classes=1000, recompute=False):
        super().__init__()
        self.embed = nn.Linear(inputs, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.recompute = recompute

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False) if self.recompute else b(x)
        return self.head(self.final_norm(x))


def run(config, rows, repeats):
    torch.manual_seed(0)
    compiled = config.endswith("_compile")
    base = config.removesuffix("_compile")
    torch.backends.cuda.matmul.allow_tf32 = base == "tf32"
    torch.backends.cudnn.allow_tf32 = base == "tf32"
    model = Mlp(recompute=base == "bf16_checkpoint").cuda()
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=base == "fp16")
    dtype = {"bf16": torch.bfloat16, "bf16_checkpoint": torch.bfloat16, "fp16": torch.float16}.get(base)
    x = torch.randn(rows, 1024, device="cuda")
    y = torch.randint(0, 1000, (rows,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(forward(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(5 if compiled else 3):  # compiling happens in the first steps
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    return {"config": config, "median_ms": ms, "rows_per_s": rows / ms * 1e3, "params": params,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--configs",
                    default="fp32,tf32,bf16,fp16,bf16_checkpoint,bf16_compile,bf16_checkpoint_compile")
    ap.add_argument("--out")
    a = ap.parse_args()
    results = []
    for c in a.configs.split(","):
        r = run(c, a.rows, a.repeats)
        results.append(r)
        print(f"{c:24s} {r['median_ms']:8.2f} ms  {r['rows_per_s'] / 1e3:7.0f} K rows/s  "
              f"peak {r['peak_allocated_gib']:.2f} GiB", flush=True)
        torch.cuda.empty_cache()
        # Written after every configuration, so a run cut short keeps what it measured.
        out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": a.rows, "results": results}
        if a.out:
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
