#!/usr/bin/env python3
"""PyTorch's side of the GPT-2 124M comparison (issue 12, ../shared/PEERS.md): d 768, 12 heads,
12 pre-LayerNorm blocks, context 1024, vocab 50304, tied embeddings, causal
scaled_dot_product_attention, GELU(tanh), trained on 16 x 1024 random token ids with random
targets; fused AdamW, clip 1.0, GradScaler for fp16 (residual_mlp.py's step).

Configurations: fp32, tf32, bf16 (autocast; the parameters are fp32, the master weights),
fp16 (autocast + GradScaler), bf16_checkpoint (bf16 with torch.utils.checkpoint around every
block); each with "_compile" runs the model under torch.compile (default mode; the optimizer
step stays eager, as in residual_mlp.py).

--part block instead times one transformer block at the same shape, forward and forward +
backward, without the optimizer (benchmarks/nn/gpt2_block_bench.cu is alloy's counterpart).

Times a whole training step (CUDA events, median of --repeats steps after warm-up), tokens per
second, and memory: peak allocated (torch.cuda.max_memory_allocated), peak reserved, and the
device memory in use (cudaMemGetInfo, context included: what llm.c's figure is). Prints a
table and writes JSON (--out) in residual_mlp.py's format ("config", "median_ms",
"peak_allocated_gib", "params", and "rows_per_s", here the LM head's rows, one per token, the
same number as "tokens_per_s"), so a script can set alloy's figures beside it.

--impl nanogpt (the default) is a plain torch model written like nanoGPT: nn.Linear layers
under Hugging Face GPT2LMHeadModel's parameter names (transformer.h.<i>.attn.c_attn.weight, ...),
stored [out, in] as alloy stores them, so weights files move between the two without
transposes; it computes what alloy's GPT-2 computes (one fused QKV product, q, k, v as strided
views of it, SDPA, one output projection) and nothing else. --impl hf times
transformers.GPT2LMHeadModel(GPT2Config(...)) from random initialization (dropout 0, SDPA
attention), to show what the usual library model costs: it adds Conv1D's addmm over
reshaped views, attention-mask handling and output objects on the same arithmetic.
"""
import argparse
import json
import math
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def init_gpt2_(module, layers):
    """GPT-2's initialization, in place: normal 0.02, c_proj weights 0.02 / sqrt(2 layers), zero
    biases; LayerNorms as constructed (ones, zeros)."""
    for name, p in module.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))
        elif name.endswith(".bias"):
            nn.init.zeros_(p)
        elif p.dim() == 2:
            nn.init.normal_(p, std=0.02)


class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        # [b, t, heads, head_dim] viewed as [b, heads, t, head_dim]: strided, no copy.
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = Mlp(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Gpt2(nn.Module):
    """GPT-2 with Hugging Face's parameter names; GPT-2's initialization (normal 0.02, the
    c_proj weights 0.02 / sqrt(2 layers), zero biases), as alloy's nn::gpt2_block declares it."""

    def __init__(self, vocab=50304, ctx=1024, d=768, layers=12, heads=12, recompute=False):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d),
            wpe=nn.Embedding(ctx, d),
            h=nn.ModuleList(Block(d, heads) for _ in range(layers)),
            ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.recompute = recompute
        init_gpt2_(self, layers)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(t, device=idx.device))
        for block in self.transformer.h:
            x = checkpoint(block, x, use_reentrant=False) if self.recompute else block(x)
        return self.lm_head(self.transformer.ln_f(x))


def hf_model(vocab, ctx, d, layers, heads, recompute):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                        use_cache=False, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config)
    print(f"transformers GPT2LMHeadModel, attention implementation "
          f"{getattr(config, '_attn_implementation', 'unknown')}", flush=True)
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    class Logits(nn.Module):  # the same call shape as Gpt2: ids in, logits out
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, idx):
            return self.m(input_ids=idx).logits

    return Logits(model)


def run(config, impl, batch, seq, repeats):
    torch.manual_seed(0)
    compiled = config.endswith("_compile")
    base = config.removesuffix("_compile")
    torch.backends.cuda.matmul.allow_tf32 = base == "tf32"
    torch.backends.cudnn.allow_tf32 = base == "tf32"
    recompute = base == "bf16_checkpoint"
    vocab, ctx, d, layers, heads = 50304, 1024, 768, 12, 12
    if impl == "hf":
        model = hf_model(vocab, ctx, d, layers, heads, recompute).cuda()
    else:
        model = Gpt2(vocab, ctx, d, layers, heads, recompute).cuda()
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=base == "fp16")
    dtype = {"bf16": torch.bfloat16, "bf16_checkpoint": torch.bfloat16, "fp16": torch.float16}.get(base)
    idx = torch.randint(0, vocab, (batch, seq), device="cuda")
    targets = torch.randint(0, vocab, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = forward(idx)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
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
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    free, total = torch.cuda.mem_get_info()
    ms = statistics.median(times)
    tokens = batch * seq
    params = sum(p.numel() for p in model.parameters())  # the tied matrix once
    return {"config": config, "impl": impl, "median_ms": ms, "tokens_per_s": tokens / ms * 1e3,
            "rows_per_s": tokens / ms * 1e3, "params": params, "loss": float(loss),
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "device_in_use_gib": (total - free) / 2**30}


def run_block(config, batch, seq, repeats):
    """One transformer block at the step's shape (alloy_bench_gpt2_block's counterpart): forward
    (keeping what backward needs, as in training) and forward + backward from a random dy,
    parameter gradients written (set to None before each step), no optimizer."""
    torch.manual_seed(0)
    compiled = config.endswith("_compile")
    base = config.removesuffix("_compile")
    torch.backends.cuda.matmul.allow_tf32 = base == "tf32"
    torch.backends.cudnn.allow_tf32 = base == "tf32"
    d, heads = 768, 12
    block = Block(d, heads).cuda()
    init_gpt2_(block, 12)
    f = torch.compile(block) if compiled else block
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(base)
    x = torch.randn(batch, seq, d, device="cuda", requires_grad=True)
    dy = torch.randn(batch, seq, d, device="cuda")

    def forward():
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            return f(x)

    def forward_backward():
        block.zero_grad(set_to_none=True)
        x.grad = None
        forward().backward(dy)

    def timed(fn):
        for _ in range(5 if compiled else 3):
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

    forward_ms = timed(forward)
    torch.cuda.reset_peak_memory_stats()
    ms = timed(forward_backward)
    tokens = batch * seq
    return {"config": config, "part": "block", "forward_ms": forward_ms, "median_ms": ms,
            "tokens_per_s": tokens / ms * 1e3, "rows_per_s": tokens / ms * 1e3,
            "params": sum(p.numel() for p in block.parameters()),
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["nanogpt", "hf"], default="nanogpt")
    ap.add_argument("--part", choices=["step", "block"], default="step",
                    help="step: the whole training step; block: one transformer block forward and backward "
                         "(configurations without _checkpoint)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--configs", help="default: fp32,tf32,bf16,fp16,bf16_checkpoint and each _compile (step); "
                                      "bf16,fp16,tf32 and each _compile (block)")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.configs is None:
        a.configs = ("bf16,fp16,tf32,bf16_compile,fp16_compile,tf32_compile" if a.part == "block" else
                     "fp32,tf32,bf16,fp16,bf16_checkpoint,fp32_compile,tf32_compile,bf16_compile,fp16_compile,"
                     "bf16_checkpoint_compile")
    if a.part == "block" and "checkpoint" in a.configs:
        ap.error("--part block times one block without recomputation; leave out the _checkpoint configurations")
    results = []
    for c in a.configs.split(","):
        if a.part == "block":
            r = run_block(c, a.batch, a.seq, a.repeats)
            print(f"block {c:20s} forward {r['forward_ms']:7.3f} ms  forward + backward {r['median_ms']:7.3f} ms  "
                  f"peak {r['peak_allocated_gib']:.2f} GiB allocated", flush=True)
        else:
            r = run(c, a.impl, a.batch, a.seq, a.repeats)
            print(f"{a.impl} {c:24s} {r['median_ms']:8.2f} ms  {r['tokens_per_s'] / 1e3:7.1f} K tokens/s  "
                  f"peak {r['peak_allocated_gib']:.2f} GiB allocated, {r['device_in_use_gib']:.2f} GiB in use  "
                  f"loss {r['loss']:.3f}", flush=True)
        results.append(r)
        torch.cuda.empty_cache()
        # Written after every configuration, so a run cut short keeps what it measured.
        out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "impl": a.impl, "part": a.part,
               "batch": a.batch, "seq": a.seq, "tokens": a.batch * a.seq, "results": results}
        if a.out:
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
