#!/usr/bin/env python3
"""A lane-level emulation of the fragment helpers of include/alloy/kernels/cuda/attention_flash.hpp
(flash_offset, flash_load_tile's placement, flash_load_a, flash_load_b, flash_load_b_transposed,
flash_a_from_accumulators, flash_stage_rows and flash_store_rows), written from the PTX ISA's
definitions of ldmatrix.m8n8.x4(.trans).b16 and mma.m16n8k16 (A row-major, B column-major, fp32
accumulators). It multiplies small integer matrices through them exactly as each attention
kernel does (forward S = Q K^T and O = P V; dq's dP = dO V^T and dQ = dS K; dk/dv's S^T = K Q^T
and dV = P^T dO) and checks each product and the staged output rows, and that no ldmatrix phase
has a shared-memory bank conflict; and that the wgmma kernels' descriptors (head_dim 64), read
through the PTX ISA's canonical 128-byte-swizzle layouts, name the same elements of those tiles.
It checks the composition, not the hardware: run it after
changing any of those helpers, which it mirrors by hand. No dependencies: python3
scripts/attention_fragments.py"""
import random
random.seed(1)

def offset(D, row, chunk):  # flash_offset, bytes
    return (row * (D // 8) + (chunk ^ (row & 7))) * 16

class Smem:
    def __init__(self): self.e = {}
    def store_tile(self, base, D, M):  # flash_load_tile: row r chunk c at offset(r, c)
        for r in range(len(M)):
            for c in range(D // 8):
                for k in range(8):
                    a = base + offset(D, r, c) + 2 * k
                    assert a not in self.e
                    self.e[a] = M[r][8 * c + k]
    def row8(self, addr):
        assert addr % 16 == 0
        return [self.e[addr + 2 * k] for k in range(8)]
    def ldmatrix(self, addrs, trans):
        mats = [[self.row8(addrs[8 * i + r]) for r in range(8)] for i in range(4)]
        regs = []
        for L in range(32):
            g, t = L // 4, L % 4
            if trans: regs.append([(m[2 * t][g], m[2 * t + 1][g]) for m in mats])
            else: regs.append([(m[g][2 * t], m[g][2 * t + 1]) for m in mats])
        return regs

def mma(C, A, B):  # C[lane][4], A[lane][4 pairs], B[lane][2 pairs]
    Am = [[None] * 16 for _ in range(16)]; Bm = [[None] * 8 for _ in range(16)]
    for L in range(32):
        g, t = L // 4, L % 4
        for i in range(2):
            Am[g][2 * t + i] = A[L][0][i]; Am[g + 8][2 * t + i] = A[L][1][i]
            Am[g][2 * t + 8 + i] = A[L][2][i]; Am[g + 8][2 * t + 8 + i] = A[L][3][i]
            Bm[2 * t + i][g] = B[L][0][i]; Bm[2 * t + 8 + i][g] = B[L][1][i]
    for L in range(32):
        g, t = L // 4, L % 4
        for e in range(4):
            r = g + 8 * (e >> 1); c = 2 * t + (e & 1)
            C[L][e] += sum(Am[r][k] * Bm[k][c] for k in range(16))

def load_a(sm, tile, D, row0, kk):
    return sm.ldmatrix([tile + offset(D, row0 + (L & 7) + ((L >> 3) & 1) * 8, 2 * kk + (L >> 4)) for L in range(32)], False)
def load_b(sm, tile, D, n0, kk):
    return sm.ldmatrix([tile + offset(D, n0 + (L & 7) + (L >> 4) * 8, 2 * kk + ((L >> 3) & 1)) for L in range(32)], False)
def load_b_t(sm, tile, D, k0, np_):
    return sm.ldmatrix([tile + offset(D, k0 + (L & 7) + ((L >> 3) & 1) * 8, 2 * np_ + (L >> 4)) for L in range(32)], True)
def a_from_acc(left, right):
    return [[(left[L][0], left[L][1]), (left[L][2], left[L][3]), (right[L][0], right[L][1]), (right[L][2], right[L][3])] for L in range(32)]
def zeros(): return [[0] * 4 for _ in range(32)]
def acc_matrix(tiles):  # n-tiles of a 16-row accumulator -> 16 x 8*len matrix
    M = [[None] * (8 * len(tiles)) for _ in range(16)]
    for n, C in enumerate(tiles):
        for L in range(32):
            g, t = L // 4, L % 4
            for e in range(4): M[g + 8 * (e >> 1)][8 * n + 2 * t + (e & 1)] = C[L][e]
    return M
def rand(r, c): return [[random.randint(-3, 3) for _ in range(c)] for _ in range(r)]
def matmul(A, B): return [[sum(A[i][k] * B[k][j] for k in range(len(B))) for j in range(len(B[0]))] for i in range(len(A))]
def T(M): return [list(x) for x in zip(*M)]
def rows(M, a, b): return M[a:b]

def check(name, got, want):
    assert got == want, name + " differs"
    print("ok", name)

for D in (64, 128):
    # Forward, one warp: rows row0..row0+15 (m-tile) of a Q tile of 128 rows; 64 keys.
    Q, K, V = rand(128, D), rand(64, D), rand(64, D)
    sm = Smem(); qt, kt, vt = 0, 128 * D * 2, 128 * D * 2 + 64 * D * 2
    sm.store_tile(qt, D, Q); sm.store_tile(kt, D, K); sm.store_tile(vt, D, V)
    for row0 in (0, 48, 112):
        qf = [load_a(sm, qt, D, row0, kk) for kk in range(D // 16)]
        s = [zeros() for _ in range(8)]
        for kk in range(D // 16):
            for np_ in range(4):
                bf = load_b(sm, kt, D, 16 * np_, kk)
                mma(s[2 * np_], qf[kk], [[x[0], x[1]] for x in bf]); mma(s[2 * np_ + 1], qf[kk], [[x[2], x[3]] for x in bf])
        S = acc_matrix(s)
        check(f"D={D} S = Q K^T rows {row0}", S, matmul(rows(Q, row0, row0 + 16), T(K)))
        o = [zeros() for _ in range(D // 8)]
        for kk in range(4):
            pa = a_from_acc(s[2 * kk], s[2 * kk + 1])
            for np_ in range(D // 16):
                bf = load_b_t(sm, vt, D, 16 * kk, np_)
                mma(o[2 * np_], pa, [[x[0], x[1]] for x in bf]); mma(o[2 * np_ + 1], pa, [[x[2], x[3]] for x in bf])
        check(f"D={D} O = S V rows {row0}", acc_matrix(o), matmul(S, V))
        # flash_stage_rows into the warp's rows of a fresh tile, then flash_store_rows' reads.
        st = Smem(); staged = {}
        for L in range(32):
            g, t = L // 4, L % 4
            for half in range(2):
                for n in range(D // 8):
                    a = offset(D, row0 + g + 8 * half, n) + 4 * t
                    assert a not in staged; staged[a] = (o[n][L][2 * half], o[n][L][2 * half + 1])
        out = [[None] * D for _ in range(16)]
        for i in range(16 * D // 8):
            r, c = i // (D // 8), i % (D // 8)
            for k in range(4):
                lo, hi = staged[offset(D, row0 + r, c) + 4 * k]
                out[r][8 * c + 2 * k], out[r][8 * c + 2 * k + 1] = lo, hi
        check(f"D={D} staged rows {row0}", out, acc_matrix(o))

    # dq kernel: dP = dO V^T (B from V, n-major), dQ = dS K (B from K, transposed); keys Bc.
    for Bc in (64, 32):
        dO, Kc = rand(64, D), rand(Bc, D)
        sm = Smem(); sm.store_tile(0, D, dO); sm.store_tile(64 * D * 2, D, Kc)
        kt = 64 * D * 2
        dof = [load_a(sm, 0, D, 16, kk) for kk in range(D // 16)]
        dp = [zeros() for _ in range(Bc // 8)]
        for kk in range(D // 16):
            for np_ in range(Bc // 16):
                bf = load_b(sm, kt, D, 16 * np_, kk)
                mma(dp[2 * np_], dof[kk], [[x[0], x[1]] for x in bf]); mma(dp[2 * np_ + 1], dof[kk], [[x[2], x[3]] for x in bf])
        DP = acc_matrix(dp)
        check(f"D={D} Bc={Bc} dP = dO K^T", DP, matmul(rows(dO, 16, 32), T(Kc)))
        dq = [zeros() for _ in range(D // 8)]
        for kk in range(Bc // 16):
            da = a_from_acc(dp[2 * kk], dp[2 * kk + 1])
            for np_ in range(D // 16):
                bf = load_b_t(sm, kt, D, 16 * kk, np_)
                mma(dq[2 * np_], da, [[x[0], x[1]] for x in bf]); mma(dq[2 * np_ + 1], da, [[x[2], x[3]] for x in bf])
        check(f"D={D} Bc={Bc} dQ = dS K", acc_matrix(dq), matmul(DP, Kc))

    # dk/dv kernel: warp 2's keys (rows 32..47 of the K tile), a query tile of Bq.
    for Bq in (64, 32):
        Kt, Qt, dOt = rand(64, D), rand(Bq, D), rand(Bq, D)
        sm = Smem(); sm.store_tile(0, D, Kt); qb = 64 * D * 2; db = qb + Bq * D * 2
        sm.store_tile(qb, D, Qt); sm.store_tile(db, D, dOt)
        s = [zeros() for _ in range(Bq // 8)]
        for kk in range(D // 16):
            ka = load_a(sm, 0, D, 32, kk)
            for np_ in range(Bq // 16):
                bf = load_b(sm, qb, D, 16 * np_, kk)
                mma(s[2 * np_], ka, [[x[0], x[1]] for x in bf]); mma(s[2 * np_ + 1], ka, [[x[2], x[3]] for x in bf])
        ST = acc_matrix(s)
        check(f"D={D} Bq={Bq} S^T = K Q^T", ST, matmul(rows(Kt, 32, 48), T(Qt)))
        dv = [zeros() for _ in range(D // 8)]
        for kk in range(Bq // 16):
            pa = a_from_acc(s[2 * kk], s[2 * kk + 1])
            for np_ in range(D // 16):
                bf = load_b_t(sm, db, D, 16 * kk, np_)
                mma(dv[2 * np_], pa, [[x[0], x[1]] for x in bf]); mma(dv[2 * np_ + 1], pa, [[x[2], x[3]] for x in bf])
        check(f"D={D} Bq={Bq} dV = P^T dO", acc_matrix(dv), matmul(ST, dOt))

# Bank conflicts: the 8 row addresses of each ldmatrix matrix fall in distinct 16-byte bank groups.
for D in (64, 128):
    for pattern in ("a", "b", "bt"):
        for row0 in (0, 16, 48):
            for kk in range(D // 16):
                if pattern == "a": addrs = [offset(D, row0 + (L & 7) + ((L >> 3) & 1) * 8, 2 * kk + (L >> 4)) for L in range(32)]
                elif pattern == "b": addrs = [offset(D, row0 + (L & 7) + (L >> 4) * 8, 2 * kk + ((L >> 3) & 1)) for L in range(32)]
                else: addrs = [offset(D, row0 + (L & 7) + ((L >> 3) & 1) * 8, 2 * kk + (L >> 4)) for L in range(32)]
                for i in range(4):
                    groups = {(addrs[8 * i + r] % 128) // 16 for r in range(8)}
                    assert len(groups) == 8, (D, pattern, row0, kk, i)
print("ok no bank conflicts in any ldmatrix phase")

# wgmma (attention_flash_wgmma.hpp, head_dim 64): the PTX ISA's canonical 128-byte-swizzle layouts,
# addressed through the kernels' descriptors, must name the same elements as the tiles flash_offset
# placed. In 16-bit elements (T = 8 to a 16-byte chunk), before the swizzle:
#   K-major   ((8,m),(T,2k)) : ((8T,SBO),(1,T))    element (row, k) of an m64 x k16 operand
#   MN-major  ((T,8,m),(8,k)) : ((1,T,LBO),(8T,SBO)) element (k, n) of a k16 x n64 operand
# then Swizzle<3,4,3> on the byte address (bits 4-6 ^= bits 7-9), the start address included: so
# the tile must begin on a 1024-byte boundary, and a K-major k-step may advance the start by 32.
def descriptor(start, lbo=16, sbo=1024):  # wgmma_descriptor
    return ((start & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (1 << 62)
def swizzle128(addr): return addr ^ (((addr >> 7) & 7) << 4)
def wgmma_k_major(desc, row, k):
    start, sbo = (desc & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
    assert desc >> 62 == 1
    return swizzle128(start + (row % 8) * 128 + (row // 8) * sbo + 2 * k)
def wgmma_mn_major(desc, k, n):
    start, lbo, sbo = (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
    return swizzle128(start + 2 * (n % 64) + (n // 64) * lbo + (k % 8) * 128 + (k // 8) * sbo)
def tile_address(base, row, col): return base + offset(64, row, col // 8) + 2 * (col % 8)
for base in (0, 16384, 40960):  # tiles at 1024-byte boundaries, as in the kernels' shared memory
    for mt in range(2):  # S = Q K^T: A = 64 rows of the Q tile from m-block mt, k-steps of 16
        for kk in range(4):
            d = descriptor(base + mt * 64 * 128 + 32 * kk)
            assert all(wgmma_k_major(d, r, k) == tile_address(base, 64 * mt + r, 16 * kk + k)
                       for r in range(64) for k in range(16)), (base, mt, kk)
    for kk in range(4):  # O += P V: B = V's rows 16 kk.. as K, head dimensions as N
        d = descriptor(base + kk * 16 * 128)
        assert all(wgmma_mn_major(d, k, n) == tile_address(base, 16 * kk + k, n)
                   for k in range(16) for n in range(64)), (base, kk)
print("ok wgmma descriptors name the swizzled tiles' elements (K-major and MN-major, head_dim 64)")
# And a tile that does not begin on a 1024-byte boundary would not (flash_wgmma_shared traps on it).
assert not all(wgmma_k_major(descriptor(512), r, 0) == tile_address(512, r, 0) for r in range(64))
print("ok a tile off the 1024-byte boundary is caught")
