#!/usr/bin/env python3
"""PyTorch's causal self-attention at GPT-2 124M's shape (batch 16, 12 heads, 1024 positions,
head_dim 64; ../shared/PEERS.md's attention table): scaled_dot_product_attention(is_causal=True)
forward, and forward + backward, per backend (torch.nn.attention.sdpa_kernel: flash, efficient,
cudnn, math), each timed alone (CUDA events, median of --repeats after warm-up). A backend that
cannot run the inputs is reported as skipped with PyTorch's reason.

--layout gpt2 (the default) gives q, k and v as alloy's kernel reads them: strided views
[batch, heads, seq, head_dim] of one [batch, seq, 3 channels] QKV activation, as GPT-2's fused
projection writes it, with the gradient landing in that activation; --layout contiguous gives
three contiguous [batch, heads, seq, head_dim] tensors (the kernels' best case).

TFLOP/s count the causal half of the products: forward 2 products of 2 b h s^2 d / 2 flops,
backward 5 (the flash backward recomputes the scores): forward + backward = 3.5 x forward.
Each backend's output is also compared with the math backend's in fp32 (max |difference|).
Prints a table and writes JSON (--out)."""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def timed(fn, repeats, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def inputs(batch, heads, seq, head_dim, dtype, layout):
    """(the leaf tensors whose gradients backward computes, and q, k, v as [batch, heads, seq,
    head_dim]). gpt2: one leaf, the QKV activation, so the timed backward includes writing dq,
    dk, dv into its gradient (as a model's backward does); contiguous: q, k, v themselves."""
    torch.manual_seed(0)
    c = heads * head_dim
    if layout == "gpt2":
        qkv = torch.randn(batch, seq, 3 * c, device="cuda", dtype=dtype, requires_grad=True)
        q, k, v = (z.view(batch, seq, heads, head_dim).transpose(1, 2) for z in qkv.split(c, dim=2))
        return (qkv,), q, k, v
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    return (q, k, v), q, k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--layout", choices=["gpt2", "contiguous"], default="gpt2")
    ap.add_argument("--backends", default="flash,efficient,cudnn,math")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out")
    a = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    leaves, q, k, v = inputs(a.batch, a.heads, a.seq, a.head_dim, dtype, a.layout)
    dout = torch.randn(a.batch, a.heads, a.seq, a.head_dim, device="cuda", dtype=dtype)
    with sdpa_kernel(SDPBackend.MATH):
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    forward_flop = 2 * (2 * a.batch * a.heads * a.seq * a.seq * a.head_dim) / 2
    results = []
    for name in a.backends.split(","):
        backend = BACKENDS[name]
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                error = (out.float() - exact).abs().max().item()

                def forward():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, is_causal=True)

                def forward_backward():
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    torch.autograd.grad(o, leaves, dout)

                fwd = timed(forward, a.repeats)
                both = timed(forward_backward, a.repeats)
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            results.append({"backend": name, "skipped": reason})
            print(f"{name:10s} skipped: {reason}", flush=True)
            continue
        r = {"backend": name, "forward_ms": fwd, "forward_backward_ms": both,
             "forward_tflops": forward_flop / fwd / 1e9, "forward_backward_tflops": 3.5 * forward_flop / both / 1e9,
             "max_abs_error_vs_fp32_math": error}
        results.append(r)
        print(f"{name:10s} forward {fwd:7.3f} ms ({r['forward_tflops']:6.1f} TFLOP/s)  forward+backward "
              f"{both:7.3f} ms ({r['forward_backward_tflops']:6.1f} TFLOP/s)  max |out - fp32 math| {error:.2e}",
              flush=True)
        torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "dtype": a.dtype, "layout": a.layout,
           "shape": {"batch": a.batch, "heads": a.heads, "seq": a.seq, "head_dim": a.head_dim}, "results": results}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
