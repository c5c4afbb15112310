#!/usr/bin/env python3
"""Weights between alloy and PyTorch, both ways, through safetensors files.

Run on the GPU machine (PyTorch and safetensors installed), from the repository root, after
`cmake --preset gpu && cmake --build --preset gpu`:

    python3 scripts/torch_weights_roundtrip.py

Options: --build DIR (where alloy_mlp was built; default build/gpu, else build/cpu), --host (run
alloy on its Host backend and torch on the CPU), --steps N, --seed N, --keep DIR (keep the files).

The model is the residual MLP of examples/mlp at its small size (64 inputs -> width 64 x 2 blocks
-> 10 classes) on the alloy side, and the same network in torch (benchmarks/peers/residual_mlp.py,
whose parameter names are alloy's). Every comparison runs on one batch of 77 rows of N(0, 1)
features and random labels, which alloy_mlp reads with --eval-input and answers with its logits and
mean cross-entropy.

(a) alloy -> torch. alloy_mlp trains --steps steps in fp32, and in bf16 compute with fp32 master
    weights, and exports its weights in fp32 and in bf16. Each file loads into the torch module with
    load_state_dict(safetensors.torch.load_file(path), strict=True). Checked: torch's logits and loss
    match alloy's (fp32 weights in an fp32 module against alloy fp32; bf16 weights in a bf16 module
    against alloy bf16), and every tensor of the bf16 file is exactly torch's rounding of the fp32
    file's (round to nearest even).
(b) torch -> alloy. A torch-initialized module is saved with safetensors.torch.save_file, in fp32 and
    in bf16. alloy_mlp imports each (--import-weights, --steps 0: the loss it reports is the loss its
    first step would start from), evaluates the batch and exports again. Checked: alloy's logits and
    loss match torch's, and the re-exported tensors equal the imported ones exactly.

Tolerances, on the largest |alloy - torch| over the logits divided by 1 + max |torch logits|, and
on |alloy loss - torch loss| / (1 + torch loss):
    fp32: 1e-4 (both all-fp32, with different kernels: cuBLASLt and alloy's LayerNorm and GELU
          against torch's, each summing in its own order);
    bf16: 3e-2 for the largest, 5e-3 for the mean logit difference and for the loss (both round
          every activation to bf16, but the products and sums before each rounding differ in
          order, and one bf16 step is 0.4 % of a value; on the Host backend alloy's bf16 logits
          were within 2e-3 of an exact forward of the same weights).
Exact checks compare bits. Prints every figure; exits 1 on any mismatch, 2 when it cannot run.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

try:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file
except ImportError as e:  # pragma: no cover
    print(f"needs PyTorch and safetensors: {e}", file=sys.stderr)
    sys.exit(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "peers"))
from residual_mlp import Mlp  # noqa: E402  (the same network, alloy's parameter names)

INPUTS, WIDTH, BLOCKS, CLASSES, ROWS = 64, 64, 2, 10, 77  # alloy_mlp --size small; 77 rows to evaluate
TOLERANCE = {"fp32": {"max": 1e-4, "mean": 1e-4, "loss": 1e-4},
             "bf16": {"max": 3e-2, "mean": 5e-3, "loss": 5e-3}}

failures = []


def check(label, ok, figures):
    print(f"  {'ok  ' if ok else 'FAIL'} {label}: {figures}", flush=True)
    if not ok:
        failures.append(label)


def find_binary(build):
    candidates = [build] if build else [os.path.join(ROOT, "build", "gpu"), os.path.join(ROOT, "build", "cpu")]
    for d in candidates:
        path = os.path.join(d, "examples", "alloy_mlp")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    print(f"alloy_mlp not found under {candidates}: build it first (cmake --preset gpu && cmake --build --preset gpu)",
          file=sys.stderr)
    sys.exit(2)


def alloy_mlp(binary, args, host, work):
    cmd = [binary, "--size", "small", "--csv", os.path.join(work, "loss.csv")] + (["--host"] if host else []) + args
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print("\n".join("    " + line for line in r.stdout.rstrip().splitlines()), flush=True)
    if r.returncode != 0:
        print(f"alloy_mlp exited with {r.returncode}", file=sys.stderr)
        sys.exit(1)


def torch_module(weights, dtype, device):
    """A torch Mlp holding `weights` (a state dict), in `dtype`, loaded with strict=True."""
    m = Mlp(inputs=INPUTS, d=WIDTH, blocks=BLOCKS, classes=CLASSES)
    m.load_state_dict(weights, strict=True)  # raises on a missing, unexpected or mis-shaped tensor
    return m.to(device=device, dtype=dtype).eval()


def compare_outputs(label, precision, module, batch, alloy_out, device):
    x, y = batch
    with torch.no_grad():
        logits = module(x.to(device=device, dtype=next(module.parameters()).dtype)).float().cpu()
    loss = F.cross_entropy(logits, y).item()  # fp32 loss from the (bf16 or fp32) logits, as alloy
    ours = load_file(alloy_out)
    diff = (ours["logits"] - logits).abs()
    scale = 1.0 + logits.abs().max().item()
    tol = TOLERANCE[precision]
    worst, mean = diff.max().item() / scale, diff.mean().item() / scale
    loss_diff = abs(ours["loss"].item() - loss) / (1.0 + loss)
    check(f"{label}: logits", worst <= tol["max"] and mean <= tol["mean"],
          f"max |diff| {diff.max().item():.3e}, relative {worst:.3e} (tolerance {tol['max']:.0e}); "
          f"mean relative {mean:.3e} (tolerance {tol['mean']:.0e}); max |torch logit| {scale - 1:.3f}")
    check(f"{label}: loss", loss_diff <= tol["loss"],
          f"alloy {ours['loss'].item():.7f}, torch {loss:.7f}, relative {loss_diff:.3e} (tolerance {tol['loss']:.0e})")


def expect_equal_tensors(label, got, want):
    """Bit-for-bit equality of two state dicts of the same names."""
    names_ok = list(got) == list(want) or sorted(got) == sorted(want)
    bad = [k for k in want if k not in got or got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
           or not torch.equal(got[k].view(torch.int16 if got[k].element_size() == 2 else torch.int32),
                              want[k].view(torch.int16 if want[k].element_size() == 2 else torch.int32))]
    check(label, names_ok and not bad,
          f"{len(want)} tensors, {sum(t.numel() for t in want.values())} values"
          + ("" if not bad else f"; differ: {bad[:5]}") + ("" if names_ok else "; names differ"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", help="the CMake build folder holding examples/alloy_mlp")
    ap.add_argument("--host", action="store_true", help="alloy on its Host backend, torch on the CPU")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="write the files here and keep them")
    a = ap.parse_args()

    binary = find_binary(a.build)
    device = "cuda" if torch.cuda.is_available() and not a.host else "cpu"
    # Full-precision products on the torch side: no tf32, no reduced-precision split-K sums.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    print(f"torch {torch.__version__} on {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
          + f"; alloy_mlp {binary}" + (" on Host" if a.host else ""), flush=True)

    work = a.keep or tempfile.mkdtemp(prefix="alloy_torch_weights_")
    os.makedirs(work, exist_ok=True)
    path = lambda name: os.path.join(work, name)  # noqa: E731

    g = torch.Generator().manual_seed(a.seed)
    batch = (torch.randn(ROWS, INPUTS, generator=g), torch.randint(0, CLASSES, (ROWS,), generator=g))
    save_file({"x": batch[0].contiguous(), "labels": batch[1].contiguous()}, path("batch.safetensors"))
    evaluate = ["--eval-input", path("batch.safetensors")]

    # (a) alloy -> torch
    for precision in ("fp32", "bf16"):
        print(f"(a) alloy trains {a.steps} steps in {precision}, torch loads its weights", flush=True)
        w32, w16, out = path(f"a_{precision}_fp32.safetensors"), path(f"a_{precision}_bf16.safetensors"), \
            path(f"a_{precision}_eval.safetensors")
        alloy_mlp(binary, ["--precision", precision, "--steps", str(a.steps), "--export-dtype", "fp32",
                           "--export-weights", w32, "--export-dtype", "bf16", "--export-weights", w16]
                  + evaluate + ["--eval-output", out], a.host, work)
        full, brain = load_file(w32), load_file(w16)
        expect_equal_tensors(f"a/{precision}: the bf16 export is torch's rounding of the fp32 export", brain,
                             {k: v.to(torch.bfloat16) for k, v in full.items()})
        module = torch_module(full if precision == "fp32" else brain,
                              torch.float32 if precision == "fp32" else torch.bfloat16, device)
        compare_outputs(f"a/{precision}: torch module from the {precision} export", precision, module, batch, out,
                        device)

    # (b) torch -> alloy
    torch.manual_seed(a.seed + 1)
    reference = Mlp(inputs=INPUTS, d=WIDTH, blocks=BLOCKS, classes=CLASSES)
    state = {k: v.detach().contiguous() for k, v in reference.state_dict().items()}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        print(f"(b) torch initializes, alloy imports in {precision}", flush=True)
        made = {k: v.to(dtype) for k, v in state.items()}
        src, back32, back16, out = path(f"b_torch_{precision}.safetensors"), path(f"b_{precision}_fp32.safetensors"), \
            path(f"b_{precision}_bf16.safetensors"), path(f"b_{precision}_eval.safetensors")
        save_file(made, src)
        alloy_mlp(binary, ["--precision", precision, "--steps", "0", "--import-weights", src,
                           "--export-dtype", "fp32", "--export-weights", back32,
                           "--export-dtype", "bf16", "--export-weights", back16]
                  + evaluate + ["--eval-output", out], a.host, work)
        expect_equal_tensors(f"b/{precision}: alloy's fp32 re-export equals the imported values",
                             load_file(back32), {k: v.float() for k, v in made.items()})
        expect_equal_tensors(f"b/{precision}: alloy's bf16 re-export is torch's rounding of the imported values",
                             load_file(back16), {k: v.to(torch.bfloat16) for k, v in made.items()})
        compare_outputs(f"b/{precision}: alloy from torch's {precision} file", precision,
                        torch_module(made, dtype, device), batch, out, device)

    if failures:
        print(f"{len(failures)} check(s) failed: " + "; ".join(failures) + f"\nthe files are in {work}")
        sys.exit(1)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print("all checks passed")


if __name__ == "__main__":
    main()
