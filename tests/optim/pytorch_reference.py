#!/usr/bin/env python3
"""PyTorch's numbers for tests/optim/pytorch_crosscheck_test.cpp: three steps of AdamW, SGD
(Nesterov), Lion (its reference formula in torch ops) and Adafactor on a fixed, formula-defined
problem, in float32 on the GPU. Prints C++ initializer lists to paste into the test, which
recomputes the same problem with alloy's Host backend. Run: python3 pytorch_reference.py"""
import math

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def initial():
    w = torch.tensor([math.sin(0.7 * i + 0.3) for i in range(30)], dtype=torch.float64).float().reshape(6, 5)
    b = torch.tensor([0.5 * math.cos(0.9 * i) for i in range(5)], dtype=torch.float64).float()
    return [w.to(DEV).requires_grad_(), b.to(DEV).requires_grad_()]


def grads(t):
    gw = torch.tensor([0.1 * math.cos(1.3 * i + 0.5 * t) for i in range(30)], dtype=torch.float64).float()
    gb = torch.tensor([0.1 * math.sin(0.4 * i - 0.2 * t) for i in range(5)], dtype=torch.float64).float()
    return [gw.reshape(6, 5).to(DEV), gb.to(DEV)]


def run(make):
    params = initial()
    opt = make(params)
    for t in range(1, 4):
        for p, g in zip(params, grads(t)):
            p.grad = g.clone()
        opt(t) if callable(opt) else opt.step()
    return torch.cat([p.detach().flatten().cpu() for p in params])


def lion(params, lr=1e-3, betas=(0.9, 0.99), wd=0.1):
    state = [torch.zeros_like(p) for p in params]

    def step(_t):
        with torch.no_grad():
            for p, m in zip(params, state):
                p.mul_(1 - lr * wd)
                update = (m * betas[0] + p.grad * (1 - betas[0])).sign_()
                p.add_(update, alpha=-lr)
                m.mul_(betas[1]).add_(p.grad, alpha=1 - betas[1])

    return step


CASES = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True,
                                      foreach=False),
    "lion": lion,
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.05, foreach=False),
}

if __name__ == "__main__":
    print(f"// torch {torch.__version__} on {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'}")
    for name, make in CASES.items():
        values = run(make).tolist()
        body = ", ".join(f"{v:.9g}f" for v in values)
        print(f"const std::vector<float> torch_{name} = {{{body}}};")
