#!/usr/bin/env python3
"""Time PyTorch (and bitsandbytes) post-backward optimizer pipelines on one GPU.

This is the peer side of alloy's optimizer-step benchmark: it reproduces the
pipelines of "What the peers measured on our GPU" (/work/shared/PEERS.md, section
"The post-backward optimizer pipeline" and the 8-bit table) so that the C++
benchmark can be compared against them in the same run, on the same GPU.

Parameter lists are shaped like GPT-2, one tensor per weight and bias
(vocab 50257, n_ctx 1024):
  "124M"  = d 768,  12 layers, 148 tensors, 124,439,808 parameters
  "1.56B" = d 1600, 48 layers, 580 tensors, 1,557,611,200 parameters
Two param groups: weight decay 0.1 on tensors with dim >= 2, 0 on vectors;
lr 1e-4, betas (0.9, 0.95), eps 1e-8. Gradients are random normal (std 1e-2),
set once before timing.

Pipelines:
  copy_ceiling               dst.copy_(src) of a 2 GiB fp32 tensor (shape "2GiB")
  torch_fp32_fused_adamw     fp32 params/grads, AdamW(fused=True).step()
  torch_amp_fp16             fp32 params/grads, GradScaler: unscale_, clip 1.0,
                             scaler.step, scaler.update (fused AdamW)
  torch_amp_bf16             fp32 params/grads, clip 1.0 + fused AdamW step
  torch_bf16_master          bf16 params/grads + fp32 master: upcast grads into
                             master .grad, clip 1.0, fused AdamW on master, copy
                             master back to bf16 (alloy's Precision<bf16, fp32_master>)
  bnb_adamw8bit_fp32         bitsandbytes AdamW8bit.step() on fp32 params/grads
  bnb_adamw8bit_bf16_master  torch_bf16_master with bitsandbytes AdamW8bit on master

Timing: CUDA events around each repeat (the GPU is idle when the start event is
recorded, so Python launch overhead counts, as it does in training); warm-up
repeats, then the median of --repeats. Anything a pipeline modifies in place
that must look the same to every repeat (grads scaled by unscale_/clip) is
restored before each repeat, outside the timed region.

Usage:
  python3 benchmarks/peers/optimizer_step.py [--shapes 124M,1.56B]
      [--pipelines a,b,...] [--repeats 20] [--warmup 5] [--out FILE.json] [--dry-run]
"""

import argparse
import datetime
import gc
import json
import math
import statistics
import sys
import time
import traceback

VOCAB = 50257
N_CTX = 1024
SHAPES = {"124M": (768, 12), "1.56B": (1600, 48)}

LR = 1e-4
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
MAX_NORM = 1.0
GRAD_STD = 1e-2
PARAM_STD = 0.02
BYTES_PER_PARAM = 28  # the bf16 + fp32-master floor: see PEERS.md

COPY_BYTES = 2 * 1024**3  # one 2 GiB fp32 tensor
COPY_SHAPE = "2GiB"

PIPELINES = [
    "copy_ceiling",
    "torch_fp32_fused_adamw",
    "torch_amp_fp16",
    "torch_amp_bf16",
    "torch_bf16_master",
    "bnb_adamw8bit_fp32",
    "bnb_adamw8bit_bf16_master",
]
BNB_PIPELINES = {"bnb_adamw8bit_fp32", "bnb_adamw8bit_bf16_master"}

# Tiny stand-ins used by --dry-run to exercise the code paths on the CPU.
TINY = {"vocab": 97, "n_ctx": 32, "d": 16}


def log(*args):
    print(*args, flush=True)


# --------------------------------------------------------------------------
# Parameter shapes


def gpt2_shapes(d, n_layer, vocab=VOCAB, n_ctx=N_CTX):
    """(name, shape) for every weight and bias of a GPT-2 of width d."""
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (n_ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def shape_list(shape_name, tiny=False):
    d, n_layer = SHAPES[shape_name]
    if tiny:
        return gpt2_shapes(TINY["d"], n_layer, TINY["vocab"], TINY["n_ctx"])
    return gpt2_shapes(d, n_layer)


def count(shapes):
    return sum(math.prod(s) for _, s in shapes), len(shapes)


# --------------------------------------------------------------------------
# Pipelines. Each builder allocates what it needs on `device` and returns
# (step, restore, watched): `step()` is the timed pipeline, `restore()` (or
# None) runs before each repeat, untimed; `watched` (or None) are the params
# the pipeline must update, for a sanity check. Everything they hold is freed
# when the three are dropped.


class Env:
    def __init__(self, torch, device, bnb=None):
        self.torch = torch
        self.device = torch.device(device)
        self.bnb = bnb
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(0)

    def randn(self, shape, dtype, std):
        t = self.torch.empty(shape, dtype=dtype, device=self.device)
        t.normal_(0.0, std, generator=self.gen)
        return t

    def params(self, shapes, dtype):
        """Leaf parameters with random normal values and random normal grads."""
        nn = self.torch.nn
        ps = []
        for _, s in shapes:
            p = nn.Parameter(self.randn(s, dtype, PARAM_STD))
            p.grad = self.randn(s, dtype, GRAD_STD)
            ps.append(p)
        return ps

    def master(self, params_lp):
        """fp32 master copies of low-precision params, with fp32 .grad buffers."""
        nn = self.torch.nn
        ms = []
        for p in params_lp:
            m = nn.Parameter(p.detach().float())  # .float() copies bf16 -> fp32
            m.grad = self.torch.zeros_like(m)
            ms.append(m)
        return ms


def param_groups(params):
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def torch_adamw(env, params):
    return env.torch.optim.AdamW(
        param_groups(params), lr=LR, betas=BETAS, eps=EPS, fused=True
    )


def bnb_adamw8bit(env, params):
    # Defaults otherwise (min_8bit_size 4096: smaller tensors keep fp32 state).
    return env.bnb.optim.AdamW8bit(param_groups(params), lr=LR, betas=BETAS, eps=EPS)


def build_copy_ceiling(env, nbytes):
    torch = env.torch
    n = nbytes // 4
    src = env.randn((n,), torch.float32, 1.0)
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)

    return step, None, None


def build_fp32_fused_adamw(env, shapes):
    params = env.params(shapes, env.torch.float32)
    opt = torch_adamw(env, params)

    def step():
        opt.step()

    return step, None, params


def build_amp_fp16(env, shapes):
    torch = env.torch
    params = env.params(shapes, torch.float32)
    opt = torch_adamw(env, params)
    scaler = torch.amp.GradScaler(env.device.type)
    # unscale_ needs the scale tensor, which GradScaler creates lazily in
    # scale(); in training scaler.scale(loss) runs before backward.
    scaler.scale(torch.ones((), device=env.device))
    scale = scaler.get_scale()  # 65536.0 by default; finite grads keep it there
    # (it doubles only after growth_interval=2000 finite steps, far beyond the repeats)
    grads = [p.grad for p in params]
    torch._foreach_mul_(grads, scale)  # as backward on a scaled loss leaves them
    saved = [g.clone() for g in grads]

    def restore():
        torch._foreach_copy_(grads, saved)  # unscale_ and clip work in place

    def step():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        scaler.step(opt)
        scaler.update()

    return step, restore, params


def build_amp_bf16(env, shapes):
    torch = env.torch
    params = env.params(shapes, torch.float32)
    opt = torch_adamw(env, params)
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]

    def restore():
        torch._foreach_copy_(grads, saved)  # clip scales the grads in place

    def step():
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()

    return step, restore, params


def build_bf16_master(env, shapes, make_opt):
    torch = env.torch
    params = env.params(shapes, torch.bfloat16)
    master = env.master(params)
    opt = make_opt(env, master)
    p_lp = [p.data for p in params]
    g_lp = [p.grad for p in params]
    p_hp = [m.data for m in master]
    g_hp = [m.grad for m in master]
    # No restore needed: the bf16 grads are only read, and the master grads
    # (which clip scales in place) are overwritten at the start of each step.

    def step():
        torch._foreach_copy_(g_hp, g_lp)  # upcast bf16 grads into the master's .grad
        torch.nn.utils.clip_grad_norm_(master, MAX_NORM)
        opt.step()
        torch._foreach_copy_(p_lp, p_hp)  # round the master back into the bf16 params

    return step, None, params


def build_bnb_fp32(env, shapes):
    params = env.params(shapes, env.torch.float32)
    opt = bnb_adamw8bit(env, params)

    def step():
        opt.step()

    return step, None, params


BUILDERS = {
    "torch_fp32_fused_adamw": build_fp32_fused_adamw,
    "torch_amp_fp16": build_amp_fp16,
    "torch_amp_bf16": build_amp_bf16,
    "torch_bf16_master": lambda env, s: build_bf16_master(env, s, torch_adamw),
    "bnb_adamw8bit_fp32": build_bnb_fp32,
    "bnb_adamw8bit_bf16_master": lambda env, s: build_bf16_master(env, s, bnb_adamw8bit),
}


# --------------------------------------------------------------------------
# Timing


def time_cuda(torch, step, restore, warmup, repeats):
    """Median ms of `repeats` timed calls of step() after `warmup` untimed ones."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + repeats):
        if restore is not None:
            restore()
        torch.cuda.synchronize()  # every repeat starts from an idle GPU
        start.record()
        step()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times), times


def snapshot(watched):
    """A few values of the first and last watched tensors (wte and ln_f.bias)."""
    if not watched:
        return None
    return [w.detach().flatten()[:4096].float().clone() for w in (watched[0], watched[-1])]


def verify(torch, watched, before):
    """None if the watched params are finite and were updated, else the problem."""
    if before is None:
        return None
    for name, a, b in zip(("first", "last"), before, snapshot(watched)):
        if not bool(torch.isfinite(b).all()):
            return f"non-finite values in the {name} param tensor"
        if torch.equal(a, b):
            return f"the {name} param tensor was not updated"
    return None


def free(torch):
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def result(pipeline, shape, params, tensors, ms=None, skipped=None, **extra):
    r = {
        "pipeline": pipeline,
        "shape": shape,
        "params": params,
        "tensors": tensors,
        "median_ms": ms,
        "tbs_at_28B": None,
        "skipped": skipped,
    }
    if ms is not None and pipeline != "copy_ceiling":
        r["tbs_at_28B"] = params * BYTES_PER_PARAM / ms / 1e9
    r.update(extra)
    return r


def run_one(torch, env, pipeline, shape, args):
    """Build, time and free one pipeline at one shape; returns a result dict."""
    if pipeline == "copy_ceiling":
        params, tensors = COPY_BYTES // 4, 1
    else:
        params, tensors = count(shape_list(shape))
    if pipeline in BNB_PIPELINES and env.bnb is None:
        return result(pipeline, shape, params, tensors, skipped=args.bnb_error)
    log(f"  {pipeline} @ {shape}: {params:,} params, {tensors} tensors ...")
    torch.cuda.reset_peak_memory_stats()
    step = restore = watched = before = None
    t0 = time.time()
    try:
        if pipeline == "copy_ceiling":
            step, restore, watched = build_copy_ceiling(env, COPY_BYTES)
        else:
            step, restore, watched = BUILDERS[pipeline](env, shape_list(shape))
        before = snapshot(watched)
        torch.cuda.synchronize()
        ms, times = time_cuda(torch, step, restore, args.warmup, args.repeats)
        peak = torch.cuda.max_memory_allocated() / 1024**3
        problem = verify(torch, watched, before)
    except Exception as e:  # OOM, a bnb kernel missing, ...: record and go on
        traceback.print_exc()
        sys.stderr.flush()
        step = restore = watched = before = None
        free(torch)
        return result(pipeline, shape, params, tensors,
                      skipped=f"error: {type(e).__name__}: {e}".strip()[:500],
                      error=True)
    step = restore = watched = before = None
    free(torch)
    extra = {"min_ms": min(times), "max_ms": max(times), "peak_alloc_gib": round(peak, 3)}
    if problem:
        extra["check"] = problem
        extra["error"] = True
        log(f"    CHECK FAILED: {problem}")
    if pipeline == "copy_ceiling":
        extra["bytes"] = 2 * COPY_BYTES  # read + written
        extra["tbs"] = 2 * COPY_BYTES / ms / 1e9
    r = result(pipeline, shape, params, tensors, ms, **extra)
    note = f"copy {r['tbs']:.2f} TB/s" if pipeline == "copy_ceiling" \
        else f"{r['tbs_at_28B']:.2f} TB/s at 28 B/param"
    log(f"    median {ms:.3f} ms (min {min(times):.3f}, max {max(times):.3f}), {note}, "
        f"peak {peak:.2f} GiB, {time.time() - t0:.1f} s")
    return r


def dry_check(torch, bnb, pipelines, shapes):
    """Run each pipeline twice on the CPU with tiny tensors (same tensor count);
    returns the number of failures."""
    env = Env(torch, "cpu", bnb)
    failures = 0
    for shape in shapes:
        for pipeline in pipelines:
            if pipeline == "copy_ceiling" and shape != shapes[0]:
                continue
            if pipeline in BNB_PIPELINES and bnb is None:
                continue
            step = restore = watched = None
            try:
                if pipeline == "copy_ceiling":
                    step, restore, watched = build_copy_ceiling(env, 4096)
                else:
                    step, restore, watched = BUILDERS[pipeline](env, shape_list(shape, tiny=True))
                before = snapshot(watched)
                for _ in range(2):
                    if restore is not None:
                        restore()
                    step()
                problem = verify(torch, watched, before)
                if problem:
                    raise AssertionError(problem)
                log(f"  tiny CPU check ok: {pipeline} @ {shape}")
            except Exception as e:
                failures += 1
                log(f"  tiny CPU check FAILED: {pipeline} @ {shape}: {type(e).__name__}: {e}")
            step = restore = watched = None
            gc.collect()
    return failures


# --------------------------------------------------------------------------
# Output


def markdown(results):
    lines = [
        "| pipeline | shape | params | tensors | median ms | TB/s at 28 B/param | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ms = "-" if r["median_ms"] is None else f"{r['median_ms']:.3f}"
        tbs = "-" if r["tbs_at_28B"] is None else f"{r['tbs_at_28B']:.2f}"
        note = ""
        if r["skipped"]:
            note = "skipped: " + r["skipped"].replace("|", "/").replace("\n", " ")[:120]
        elif r.get("check"):
            note = "CHECK FAILED: " + r["check"]
        elif r.get("tbs") is not None:
            note = f"copy {r['tbs']:.2f} TB/s"
        lines.append(f"| {r['pipeline']} | {r['shape']} | {r['params']:,} | {r['tensors']} "
                     f"| {ms} | {tbs} | {note} |")
    return "\n".join(lines)


def parse_list(text, allowed, what):
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        sys.exit(f"unknown {what}: {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
    return items


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="comma list of %s (default: all)" % ", ".join(SHAPES))
    ap.add_argument("--pipelines", default=",".join(PIPELINES),
                    help="comma list (default: all): " + ", ".join(PIPELINES))
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warm-up repeats")
    ap.add_argument("--out", help="write the results as JSON to this file")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: list shapes and pipelines, exercise them on tiny CPU tensors")
    args = ap.parse_args(argv)
    shapes = parse_list(args.shapes, list(SHAPES), "shape")
    pipelines = parse_list(args.pipelines, PIPELINES, "pipeline")
    if args.repeats < 1 or args.warmup < 0:
        sys.exit("--repeats must be >= 1 and --warmup >= 0")

    try:
        import torch
    except Exception as e:  # only --dry-run can go on without torch
        if not args.dry_run:
            raise
        torch = None
        log(f"torch not importable ({type(e).__name__}: {e}); listing shapes only")

    bnb, args.bnb_error = None, None
    if torch is not None and BNB_PIPELINES & set(pipelines):
        try:
            import bitsandbytes as bnb
        except Exception as e:
            bnb = None
            args.bnb_error = f"import bitsandbytes failed: {type(e).__name__}: {e}".strip()
            log(args.bnb_error)

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("CUDA is not available (use --dry-run to check the script without a GPU)")

    info = {
        "device": torch.cuda.get_device_name() if torch is not None and not args.dry_run else "dry-run",
        "torch": torch.__version__ if torch is not None else None,
        "bitsandbytes": getattr(bnb, "__version__", None) if bnb is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cuda": getattr(torch.version, "cuda", None) if torch is not None else None,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "dry_run": args.dry_run,
    }
    log(f"device: {info['device']}, torch {info['torch']}, bitsandbytes {info['bitsandbytes']}, "
        f"cuda {info['cuda']}, warm-up {args.warmup}, median of {args.repeats}")

    # (pipeline, shape) in run order: the copy ceiling once, first.
    todo = []
    if "copy_ceiling" in pipelines:
        todo.append(("copy_ceiling", COPY_SHAPE))
    for shape in shapes:
        todo += [(p, shape) for p in pipelines if p != "copy_ceiling"]

    results = []
    failures = 0
    if args.dry_run:
        for pipeline, shape in todo:
            if pipeline == "copy_ceiling":
                params, tensors = COPY_BYTES // 4, 1
            else:
                params, tensors = count(shape_list(shape))
            skipped = "dry-run"
            if torch is not None and pipeline in BNB_PIPELINES and bnb is None:
                skipped = args.bnb_error
            results.append(result(pipeline, shape, params, tensors, skipped=skipped))
        if torch is not None:
            failures = dry_check(torch, bnb, pipelines, shapes)
    else:
        env = Env(torch, "cuda", bnb)
        for i, (pipeline, shape) in enumerate(todo):
            log(f"[{i + 1}/{len(todo)}]")
            results.append(run_one(torch, env, pipeline, shape, args))

    info["results"] = results
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
        log(f"wrote {args.out}")
    print()
    print(markdown(results), flush=True)
    return 1 if failures or any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
