#!/usr/bin/env python3
"""A tile-level emulation of the control logic of attention's tensor-core kernels (the three of
include/alloy/kernels/cuda/attention_flash.hpp, whose structure attention_flash_f32.hpp's share:
the tile loops and their bounds, the warps' skips, the mask conditions, the
zero-filled tails, the online softmax and lse, delta through scratch), mirrored by hand, against
a naive float64 formulation, for sequence lengths around the tiles (1, 7, 63, 64, 65, 127, 129,
200) and every tile configuration (the 16-bit kernels: head_dim 64: 128-row forward tiles, 64-key
dq tiles, 64-query dk/dv tiles; head_dim 128: 64, 32, 32; cuda/attention_flash_f32.hpp's float
kernels: 64, 64, 64 and 64, 32, 16). Products are plain dot products here;
scripts/attention_fragments.py and scripts/attention_fragments_tf32.py check the fragment-level
ones. Each output row must be written exactly once. No dependencies: python3
scripts/attention_tiles.py"""
import math, random
random.seed(2)
W = 6
LOG2E, LN2 = 1 / math.log(2), math.log(2)
def dot(a, b): return sum(x * y for x, y in zip(a, b))
def vec(): return [random.gauss(0, 1) for _ in range(W)]

def naive(Q, K, V, dO, scale):
    n = len(Q); out, lse = [], []
    P = [[0.0] * n for _ in range(n)]
    for t in range(n):
        s = [scale * dot(Q[t], K[j]) for j in range(t + 1)]; m = max(s); z = sum(math.exp(x - m) for x in s)
        lse.append(m + math.log(z))
        for j in range(t + 1): P[t][j] = math.exp(s[j] - lse[t])
        out.append([sum(P[t][j] * V[j][d] for j in range(t + 1)) for d in range(W)])
    delta = [dot(dO[t], out[t]) for t in range(n)]
    dS = [[P[t][j] * (dot(dO[t], V[j]) - delta[t]) if j <= t else 0.0 for j in range(n)] for t in range(n)]
    dq = [[scale * sum(dS[t][j] * K[j][d] for j in range(n)) for d in range(W)] for t in range(n)]
    dk = [[scale * sum(dS[t][j] * Q[t][d] for t in range(n)) for d in range(W)] for j in range(n)]
    dv = [[sum(P[t][j] * dO[t][d] for t in range(n)) for d in range(W)] for j in range(n)]
    return out, lse, dq, dk, dv

def tile(M, first, rows, seq):  # flash_load_tile: zeros past seq
    return [M[first + r] if first + r < seq else [0.0] * W for r in range(rows)]
def floats(v, first, rows, seq): return [v[first + r] if first + r < seq else 0.0 for r in range(rows)]

def forward(Q, K, V, scale, m_tiles):
    seq = len(Q); warps, Bc = 4, 64; warp_rows = 16 * m_tiles; Br = warps * warp_rows
    sl2 = scale * LOG2E
    out = [None] * seq; lse = [None] * seq
    query_tiles = (seq + Br - 1) // Br
    for block in range(query_tiles):
        qb = query_tiles - 1 - block
        q0 = qb * Br; key_tiles = (min(q0 + Br, seq) - 1) // Bc + 1
        qt = tile(Q, q0, Br, seq)
        for w in range(warps):
            row0 = w * warp_rows; last = q0 + row0 + warp_rows - 1
            m = [-math.inf] * warp_rows; l = [0.0] * warp_rows; o = [[0.0] * W for _ in range(warp_rows)]
            for j in range(key_tiles):
                k0 = j * Bc
                if k0 > last: continue
                kt, vt = tile(K, k0, Bc, seq), tile(V, k0, Bc, seq)
                for r in range(warp_rows):
                    row = q0 + row0 + r
                    s = [dot(qt[row0 + r], kt[c]) for c in range(Bc)]
                    if k0 + Bc - 1 > q0 + row0:
                        s = [-math.inf if k0 + c > row else x for c, x in enumerate(s)]
                    nxt = max(m[r], max(s) * sl2)
                    f = 2 ** (m[r] - nxt) if m[r] != -math.inf else 0.0
                    p = [2 ** (x * sl2 - nxt) if x != -math.inf else 0.0 for x in s]
                    l[r] = l[r] * f + sum(p); m[r] = nxt
                    o[r] = [o[r][d] * f + sum(p[c] * vt[c][d] for c in range(Bc)) for d in range(W)]
            for r in range(warp_rows):
                row = q0 + row0 + r
                if row < seq:
                    assert out[row] is None
                    out[row] = [x / l[r] for x in o[r]]; lse[row] = m[r] * LN2 + math.log(l[r])
    return out, lse

def backward(Q, K, V, O, dO, lse, scale, Bc_dq, Bq):
    seq = len(Q); warps = 4; sl2 = scale * LOG2E
    dq = [None] * seq; dk = [None] * seq; dv = [None] * seq; scratch = [math.nan] * seq
    Br = 64; query_tiles = (seq + Br - 1) // Br
    for block in range(query_tiles):  # dq kernel
        qb = query_tiles - 1 - block; q0 = qb * Br
        key_tiles = (min(q0 + Br, seq) - 1) // Bc_dq + 1
        qt, dot_ = tile(Q, q0, Br, seq), tile(dO, q0, Br, seq)
        for w in range(warps):
            row0 = w * 16; last = q0 + row0 + 15
            delta, lse2 = [], []
            for r in range(16):
                t = q0 + row0 + r
                d = dot(dot_[row0 + r], O[t]) if t < seq else 0.0
                if t < seq: scratch[t] = d
                delta.append(d); lse2.append(lse[t] * LOG2E if t < seq else 0.0)
            acc = [[0.0] * W for _ in range(16)]
            for j in range(key_tiles):
                k0 = j * Bc_dq
                if k0 > last: continue
                kt, vt = tile(K, k0, Bc_dq, seq), tile(V, k0, Bc_dq, seq)
                masking = k0 + Bc_dq - 1 > q0 + row0
                for r in range(16):
                    row = q0 + row0 + r
                    for c in range(Bc_dq):
                        p = 2 ** (dot(qt[row0 + r], kt[c]) * sl2 - lse2[r])
                        if masking and k0 + c > row: p = 0.0
                        ds = p * (dot(dot_[row0 + r], vt[c]) - delta[r])
                        acc[r] = [acc[r][d] + ds * kt[c][d] for d in range(W)]
            for r in range(16):
                t = q0 + row0 + r
                if t < seq: assert dq[t] is None; dq[t] = [scale * x for x in acc[r]]
    Bc = 64
    for kb in range((seq + Bc - 1) // Bc):  # dk/dv kernel, after the dq kernel wrote scratch
        k0 = kb * Bc; first, last_tile = k0 // Bq, (seq - 1) // Bq
        kt, vt = tile(K, k0, Bc, seq), tile(V, k0, Bc, seq)
        dka = [[0.0] * W for _ in range(Bc)]; dva = [[0.0] * W for _ in range(Bc)]
        for i in range(first, last_tile + 1):
            q0 = i * Bq
            qt, dot_ = tile(Q, q0, Bq, seq), tile(dO, q0, Bq, seq)
            lt, dt = floats(lse, q0, Bq, seq), floats(scratch, q0, Bq, seq)
            for w in range(warps):
                key0 = k0 + 16 * w
                if q0 + Bq - 1 < key0: continue
                masking = q0 < key0 + 15 or q0 + Bq > seq
                for r in range(16):
                    key = key0 + r; kr = 16 * w + r
                    for c in range(Bq):
                        query = q0 + c
                        p = 2 ** (dot(kt[kr], qt[c]) * sl2 - lt[c] * LOG2E)
                        if masking and (key > query or query >= seq): p = 0.0
                        ds = p * (dot(vt[kr], dot_[c]) - dt[c])
                        dva[kr] = [dva[kr][d] + p * dot_[c][d] for d in range(W)]
                        dka[kr] = [dka[kr][d] + ds * qt[c][d] for d in range(W)]
        for kr in range(Bc):
            if k0 + kr < seq: assert dk[k0 + kr] is None; dk[k0 + kr] = [scale * x for x in dka[kr]]; dv[k0 + kr] = dva[kr]
    return dq, dk, dv

def close(a, b, what):
    err = max(abs(x - y) / (1 + abs(y)) for ra, rb in zip(a, b) for x, y in zip(ra if isinstance(ra, list) else [ra], rb if isinstance(rb, list) else [rb]))
    assert err < 1e-9, (what, err)

# 16-bit kernels (cuda/attention_flash.hpp), then the float ones (cuda/attention_flash_f32.hpp).
for D, m_tiles, Bc_dq, Bq in ((64, 2, 64, 64), (128, 1, 32, 32), (64, 1, 64, 64), (128, 1, 32, 16)):
    for seq in (1, 7, 63, 64, 65, 127, 129, 200):
        Q = [[x * 1.5 for x in vec()] for _ in range(seq)]; K = [vec() for _ in range(seq)]
        V = [vec() for _ in range(seq)]; dO = [vec() for _ in range(seq)]
        scale = 1 / math.sqrt(D)
        out, lse, dq, dk, dv = naive(Q, K, V, dO, scale)
        fo, fl = forward(Q, K, V, scale, m_tiles)
        close(fo, out, "out"); close(fl, lse, "lse")
        gq, gk, gv = backward(Q, K, V, out, dO, lse, scale, Bc_dq, Bq)
        close(gq, dq, "dq"); close(gk, dk, "dk"); close(gv, dv, "dv")
        print(f"ok head_dim {D} tiles ({16 * 4 * m_tiles}, {Bc_dq}, {Bq}), seq {seq}: out, lse, dq, dk, dv")
