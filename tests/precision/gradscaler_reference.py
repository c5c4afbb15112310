#!/usr/bin/env python3
"""Drives PyTorch's own GradScaler update, torch._amp_update_scale_ (what
torch.amp.GradScaler.update() calls), on CPU tensors over the overflow sequences of
tests/precision/gradscaler_test.cpp, and checks that it lands on the same scales as
alloy's DynamicLossScaleConfig::grad_scaler(): the digests below are the ones that test
asserts for alloy. Prints each scenario's summary in the test's format.

    python3 tests/precision/gradscaler_reference.py            # exit 0: torch agrees with alloy
    python3 tests/precision/gradscaler_reference.py --trace DIR

--trace writes DIR/<scenario>.torch.txt, one step a line ("step scale_bits tracker", the bits in hex); the C++
test writes DIR/<scenario>.cpp.txt with ALLOY_GRADSCALER_TRACE=DIR, for a diff.
Needs only torch (any device; the update runs on the CPU). About a minute.
"""
import argparse
import math
import os
import struct
import sys

import torch

MASK64 = (1 << 64) - 1


class Lcg:
    """Knuth's MMIX LCG, as in the C++ test."""

    def __init__(self, seed):
        self.state = seed

    def next(self):
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) & MASK64
        return self.state >> 32


def p(probability):
    return int(probability * 4294967296.0)


def overflow_sequence(seed, fixed_head, random_steps, max_phase, thresholds, fixed_tail):
    rng = Lcg(seed)
    out = []

    def run(steps, threshold):
        for _ in range(steps):
            out.append(rng.next() < threshold)

    for steps, threshold in fixed_head:
        run(steps, threshold)
    done = 0
    while done < random_steps:
        length = min(1 + rng.next() % max_phase, random_steps - done)
        threshold = thresholds[rng.next() % len(thresholds)]
        run(length, threshold)
        done += length
    for steps, threshold in fixed_tail:
        run(steps, threshold)
    return out


# GradScaler's defaults (init 2^16, growth 2, backoff 0.5, interval 2000), as grad_scaler().
SCENARIOS = [
    dict(name="preset_limits", interval=2000, digest=0x5F845280BD4A980D,
         seq=lambda: overflow_sequence(20261201, [(240000, 0)], 200000, 20000,
                                       [0, p(2.0 ** -14), p(2.0 ** -11), p(2.0 ** -8)],
                                       [(600, p(7.0 / 8.0)), (5000, p(1.0 / 16.0))])),
    dict(name="interval3_random", interval=3, digest=0x7C917BE76A5F58AA,
         seq=lambda: overflow_sequence(7, [], 1000000, 1024,
                                       [p(1.0 / 32), p(1.0 / 8), p(1.0 / 5), p(1.0 / 4)], [])),
]
INIT, GROWTH, BACKOFF = 65536.0, 2.0, 0.5


def bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def check_gradscaler_defaults():
    try:
        scaler = torch.amp.GradScaler("cpu")
    except Exception:  # older torch: GradScaler on CUDA only
        scaler = torch.cuda.amp.GradScaler(enabled=torch.cuda.is_available())
    if not scaler.is_enabled():
        print("GradScaler defaults: not checked (GradScaler disabled here)")
        return True
    # get_scale() is the initial scale until the first update (there is no get_init_scale()).
    got = (scaler.get_scale(), scaler.get_growth_factor(), scaler.get_backoff_factor(),
           scaler.get_growth_interval())
    ok = got == (INIT, GROWTH, BACKOFF, 2000)
    print(f"GradScaler defaults (init, growth, backoff, interval): {got}: {'as grad_scaler()' if ok else 'DIFFERENT'}")
    return ok


def run(scenario, trace_dir):
    seq = scenario["seq"]()
    interval = scenario["interval"]
    scale = torch.full((), INIT, dtype=torch.float32)
    tracker = torch.zeros((), dtype=torch.int32)
    inf = torch.ones((), dtype=torch.float32)
    finite = torch.zeros((), dtype=torch.float32)
    digest = 14695981039346656037
    largest, smallest, zero = 0.0, math.inf, False
    grew = backed_off = refused = 0
    trace = open(os.path.join(trace_dir, scenario["name"] + ".torch.txt"), "w") if trace_dir else None
    for i, overflow in enumerate(seq):
        before, tracker_before = scale.item(), int(tracker.item())
        torch._amp_update_scale_(scale, tracker, inf if overflow else finite, GROWTH, BACKOFF, interval)
        s, t = scale.item(), int(tracker.item())
        for word in (bits(s), t & 0xFFFFFFFF):
            for b in range(4):
                digest = ((digest ^ ((word >> (8 * b)) & 0xFF)) * 1099511628211) & MASK64
        if trace:
            trace.write(f"{i} {bits(s):08x} {t}\n")
        largest = max(largest, s)
        if s > 0:
            smallest = min(smallest, s)
        zero = zero or s == 0.0
        grew += s > before
        backed_off += overflow and s < before
        refused += (not overflow) and tracker_before + 1 == interval and s == before
    if trace:
        trace.close()
    print(f"{scenario['name']}: {len(seq)} steps, digest {digest:016x}, largest {'%.9g' % largest}, "
          f"smallest positive {'%.9g' % smallest}, zero {int(zero)}, grew {grew}, backed off {backed_off}, "
          f"growth refused {refused}")
    ok = digest == scenario["digest"]
    print(f"  {'same as' if ok else 'DIFFERENT from'} alloy's digest {scenario['digest']:016x}")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", metavar="DIR", help="write every step's scale and tracker to DIR")
    args = parser.parse_args()
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
    print(f"torch {torch.__version__}")
    ok = check_gradscaler_defaults()
    for scenario in SCENARIOS:
        ok = run(scenario, args.trace) and ok
    print("torch's GradScaler update and alloy's grad_scaler() agree" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
