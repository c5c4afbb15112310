#!/usr/bin/env python3
"""A lane-level emulation of the fragment helpers of include/alloy/kernels/cuda/attention_flash_f32.hpp
(FlashPaddedRows, flash_load_rows' placement, flash_load_a_f32, flash_load_b_f32,
flash_load_b_rows_f32, flash_a_from_accumulator, flash_stage_rows_f32 and flash_store_rows), written
from the PTX ISA's fragment layouts of mma.m16n8k8 with .tf32 inputs (A row-major: a0 (g, tq),
a1 (g + 8, tq), a2 (g, tq + 4), a3 (g + 8, tq + 4); B column-major: b0 (tq, g), b1 (tq + 4, g);
fp32 accumulators c0, c1 (g, 2 tq..), c2, c3 (g + 8, 2 tq..)). It multiplies small integer
matrices through them exactly as each kernel does (forward S = Q K^T and O = P V; dq's S, dP =
dO V^T and dQ = dS K; dk/dv's S^T = K Q^T, dP^T = V dO^T, dV = P^T dO and dK = dS^T Q), at both
head sizes and every tile size the kernels use, and checks each product and the staged output
rows; that no 32-bit fragment load has a shared-memory bank conflict; and, on float32 values
emulated bit for bit, that flash_operand's tf32 rounding is round_to_tf32's and that its 3xTF32
split reproduces products within 3 2^-22 (relative). It checks the composition, not the hardware:
run it after changing any of those helpers, which it mirrors by hand. No dependencies:
python3 scripts/attention_fragments_tf32.py"""
import math, random, struct
random.seed(3)

def offset(D, row, chunk):  # FlashPaddedRows<D>::offset, bytes
    return (row * (D + 4) + 4 * chunk) * 4

def word(D, row, col):  # element (row, col) of a padded tile, in 4-byte words
    return row * (D + 4) + col

class Smem:
    def __init__(self): self.w = {}
    def store_tile(self, base, D, M):  # flash_load_rows: row r, chunk c at offset(r, c), 4 floats
        assert base % 16 == 0
        for r in range(len(M)):
            for c in range(D // 4):
                a = base + offset(D, r, c)
                assert a % 16 == 0
                for k in range(4):
                    assert (a // 4 + k) not in self.w
                    self.w[a // 4 + k] = M[r][4 * c + k]
    def lds(self, addrs):  # one 32-bit load per lane (word addresses); returns values, checks banks
        banks = {}
        for a in addrs: banks.setdefault(a % 32, set()).add(a)
        assert all(len(s) == 1 for s in banks.values()), "bank conflict"
        return [self.w[a] for a in addrs]

LANES = range(32)
def g_of(L): return L // 4
def t_of(L): return L % 4

# The kernel's loads, lane by lane (tile = word address of row 0).
def load_a(sm, tile, D, row0, k0):
    s = D + 4
    p = [tile + (row0 + g_of(L)) * s + k0 + t_of(L) for L in LANES]
    regs = [sm.lds(p), sm.lds([x + 8 * s for x in p]), sm.lds([x + 4 for x in p]), sm.lds([x + 8 * s + 4 for x in p])]
    return [[regs[i][L] for i in range(4)] for L in LANES]
def load_b(sm, tile, D, n0, k0):
    p = [tile + (n0 + g_of(L)) * (D + 4) + k0 + t_of(L) for L in LANES]
    regs = [sm.lds(p), sm.lds([x + 4 for x in p])]
    return [[regs[i][L] for i in range(2)] for L in LANES]
def load_b_rows(sm, tile, D, k0, n0):
    s = D + 4
    p = [tile + (k0 + 2 * t_of(L)) * s + n0 + g_of(L) for L in LANES]
    regs = [sm.lds(p), sm.lds([x + s for x in p])]
    return [[regs[i][L] for i in range(2)] for L in LANES]
def a_from_acc(C): return [[C[L][0], C[L][2], C[L][1], C[L][3]] for L in LANES]

def mma(C, A, B):  # the PTX semantics of mma.m16n8k8 .tf32 (exact integer arithmetic here)
    Am = [[None] * 8 for _ in range(16)]; Bm = [[None] * 8 for _ in range(8)]
    for L in LANES:
        g, t = g_of(L), t_of(L)
        Am[g][t], Am[g + 8][t], Am[g][t + 4], Am[g + 8][t + 4] = A[L]
        Bm[t][g], Bm[t + 4][g] = B[L]
    for L in LANES:
        g, t = g_of(L), t_of(L)
        for e in range(4):
            r = g + 8 * (e >> 1); c = 2 * t + (e & 1)
            C[L][e] += sum(Am[r][k] * Bm[k][c] for k in range(8))

def zeros(): return [[0] * 4 for _ in LANES]
def acc_matrix(tiles):  # n-tiles of a 16-row accumulator -> 16 x 8 len matrix
    M = [[None] * (8 * len(tiles)) for _ in range(16)]
    for n, C in enumerate(tiles):
        for L in LANES:
            for e in range(4): M[g_of(L) + 8 * (e >> 1)][8 * n + 2 * t_of(L) + (e & 1)] = C[L][e]
    return M
def rand(r, c): return [[random.randint(-3, 3) for _ in range(c)] for _ in range(r)]
def matmul(A, B): return [[sum(A[i][k] * B[k][j] for k in range(len(B))) for j in range(len(B[0]))] for i in range(len(A))]
def T(M): return [list(x) for x in zip(*M)]

def check(name, got, want):
    assert got == want, name + " differs"
    print("ok", name)

# Products as the kernels form them: S-like (A from a row tile, B n-major) and accumulator-fed
# (A from the previous product's accumulators, B from a k-major tile with rows 2 tq, 2 tq + 1).
def product_nmajor(sm, a_tile, a_row0, b_tile, D, n_tiles):
    s = [zeros() for _ in range(n_tiles)]
    for kk in range(D // 8):
        a = load_a(sm, a_tile, D, a_row0, 8 * kk)
        for n in range(n_tiles): mma(s[n], a, load_b(sm, b_tile, D, 8 * n, 8 * kk))
    return s
def product_from_acc(sm, acc, b_tile, D):
    o = [zeros() for _ in range(D // 8)]
    for kk in range(len(acc)):
        a = a_from_acc(acc[kk])
        for n in range(D // 8): mma(o[n], a, load_b_rows(sm, b_tile, D, 8 * kk, 8 * n))
    return o

def stage_and_store(o, D, row0):  # flash_stage_rows_f32 into a fresh tile, then flash_store_rows
    staged = {}
    for L in LANES:
        for half in range(2):
            for n in range(D // 8):
                a = word(D, row0 + g_of(L) + 8 * half, 8 * n + 2 * t_of(L))
                assert a % 2 == 0 and a not in staged and a + 1 not in staged
                staged[a], staged[a + 1] = o[n][L][2 * half], o[n][L][2 * half + 1]
    out = [[None] * D for _ in range(16)]
    for i in range(16 * D // 4):
        r, c = i // (D // 4), i % (D // 4)
        a = offset(D, row0 + r, c) // 4
        for k in range(4): out[r][4 * c + k] = staged[a + k]
    return out

for D in (64, 128):
    # Forward: a warp's 16 rows of a 64-row Q tile against a 64-key tile.
    Q, K, V = rand(64, D), rand(64, D), rand(64, D)
    sm = Smem(); qt = 0; kt = 64 * (D + 4); vt = kt + 64 * (D + 4)
    sm.store_tile(4 * qt, D, Q); sm.store_tile(4 * kt, D, K); sm.store_tile(4 * vt, D, V)
    for row0 in (0, 16, 48):
        s = product_nmajor(sm, qt, row0, kt, D, 8)
        S = acc_matrix(s)
        check(f"D={D} S = Q K^T rows {row0}", S, matmul(Q[row0:row0 + 16], T(K)))
        o = product_from_acc(sm, s, vt, D)
        check(f"D={D} O = S V rows {row0}", acc_matrix(o), matmul(S, V))
        check(f"D={D} staged rows {row0}", stage_and_store(o, D, row0), acc_matrix(o))

    # dq kernel: dP = dO V^T (B from V, n-major), dQ = dS K (B from K, rows 2 tq..); keys Bc.
    for Bc in ((64,) if D == 64 else (32,)):
        dO, Kc, Vc = rand(64, D), rand(Bc, D), rand(Bc, D)
        sm = Smem(); dt = 64 * (D + 4); kt = 2 * 64 * (D + 4); vt = kt + Bc * (D + 4)
        sm.store_tile(0, D, rand(64, D)); sm.store_tile(4 * dt, D, dO)
        sm.store_tile(4 * kt, D, Kc); sm.store_tile(4 * vt, D, Vc)
        dp = product_nmajor(sm, dt, 16, vt, D, Bc // 8)
        DP = acc_matrix(dp)
        check(f"D={D} Bc={Bc} dP = dO V^T", DP, matmul(dO[16:32], T(Vc)))
        dq = product_from_acc(sm, dp, kt, D)
        check(f"D={D} Bc={Bc} dQ = dS K", acc_matrix(dq), matmul(DP, Kc))

    # dk/dv kernel: warp 2's keys (rows 32..47 of the K and V tiles), a query tile of Bq.
    for Bq in ((64,) if D == 64 else (16,)):
        Kt, Vt, Qt, dOt = rand(64, D), rand(64, D), rand(Bq, D), rand(Bq, D)
        sm = Smem(); vb = 64 * (D + 4); qb = 2 * vb; db = qb + Bq * (D + 4)
        sm.store_tile(0, D, Kt); sm.store_tile(4 * vb, D, Vt); sm.store_tile(4 * qb, D, Qt); sm.store_tile(4 * db, D, dOt)
        s = product_nmajor(sm, 0, 32, qb, D, Bq // 8)
        ST = acc_matrix(s)
        check(f"D={D} Bq={Bq} S^T = K Q^T", ST, matmul(Kt[32:48], T(Qt)))
        dp = product_nmajor(sm, vb, 32, db, D, Bq // 8)
        DPT = acc_matrix(dp)
        check(f"D={D} Bq={Bq} dP^T = V dO^T", DPT, matmul(Vt[32:48], T(dOt)))
        check(f"D={D} Bq={Bq} dV = P^T dO", acc_matrix(product_from_acc(sm, s, db, D)), matmul(ST, dOt))
        dk = product_from_acc(sm, dp, qb, D)
        check(f"D={D} Bq={Bq} dK = dS^T Q", acc_matrix(dk), matmul(DPT, Qt))
        check(f"D={D} Bq={Bq} staged dK rows 32", stage_and_store(dk, D, 32), acc_matrix(dk))
print("ok no bank conflicts in any 32-bit fragment load (Smem.lds asserts it)")

# float32 arithmetic, bit for bit.
def f32(x): return struct.unpack("<f", struct.pack("<f", x))[0]
def bits(x): return struct.unpack("<I", struct.pack("<f", x))[0]
def from_bits(u): return struct.unpack("<f", struct.pack("<I", u & 0xffffffff))[0]
def round_to_tf32(x):  # numeric/rounding.hpp
    u = bits(x)
    if (u & 0x7fffffff) >= 0x7f800000: return x
    return from_bits((u + 0xfff + ((u >> 13) & 1)) & ~0x1fff)
def tf32_bits_rna(x): return from_bits((bits(x) + 0x1000) & ~0x1fff)  # flash_tf32_bits
def split(x):  # flash_operand, 3xTF32
    big = tf32_bits_rna(x); small = tf32_bits_rna(f32(x - big))
    assert f32(x - big) == x - big  # exact
    return big, small

worst = 0.0
for _ in range(200000):
    a = f32(random.gauss(0, 1) * 2.0 ** random.randint(-20, 20)); b = f32(random.gauss(0, 1) * 2.0 ** random.randint(-20, 20))
    if a == 0 or b == 0: continue
    for x in (a, b):
        r = round_to_tf32(x)
        assert bits(r) & 0x1fff == 0 and abs(r - x) <= abs(x) * 2.0 ** -11
    (ab, as_), (bb, bs) = split(a), split(b)
    for v in (ab, as_, bb, bs): assert bits(v) & 0x1fff == 0
    approx = as_ * bb + ab * bs + ab * bb  # exact products of tf32 values, summed exactly (Python floats)
    worst = max(worst, abs(approx - a * b) / abs(a * b))
assert worst <= 3 * 2.0 ** -22, worst
print(f"ok 3xTF32 products within {worst / 2.0 ** -22:.3f} x 2^-22 of exact (bound 3)")
# Ties: round_to_tf32 goes to even, flash_tf32_bits (used only for the 3xTF32 split) away from zero.
assert round_to_tf32(from_bits(0x3f801000)) == from_bits(0x3f800000)
assert round_to_tf32(from_bits(0x3f803000)) == from_bits(0x3f804000)
assert tf32_bits_rna(from_bits(0x3f801000)) == from_bits(0x3f802000)
print("ok tf32 rounding: ties to even (round_to_tf32), away from zero (the split)")
