"""Fused causal attention in Triton, FlashAttention-2 style: forward and backward.

An optional kernel. The model runs without it everywhere (`--attn sdpa` or `eager`); on a CUDA GPU,
`--attn triton` routes minicpm.py's attention through `flash_attention` below.

How it works (Dao 2023, "FlashAttention-2"):
  forward   one program per (query block, batch x query head). It walks over key blocks keeping a
            running row max m, row sum l and an unnormalised output, rescaling them whenever the max
            grows (the online softmax), so the T x T score matrix never exists in memory. It stores
            O and the log-sum-exp L of each row, which is all the backward needs.
  backward  recomputes the probabilities tile by tile from Q, K and L: P = exp(S - L).
            With D_i = rowsum(dO * O): dV = P^T dO, dP = dO V^T, dS = P * (dP - D), dQ = dS K, dK = dS^T Q
            (times the softmax scale). One kernel owns a key block and accumulates dK, dV over all
            the query blocks and all query heads sharing its KV head (grouped-query attention);
            another owns a query block and accumulates dQ over the key blocks.

Run:    python tools/kernel_bench.py [--out bench]   (needs a CUDA GPU; times it against SDPA flash and eager,
                                                      writes attention.csv and .png)
        python tools/aot.py [--out bench]            (no GPU needed: compiles for sm_80 and sm_90, checks
                                                      registers and shared memory; writes aot.csv)
Test:   python -m pytest -q tests/test_kernels.py     (on CPU through Triton's interpreter, fp32)
The interpreter (TRITON_INTERPRET=1) must be switched on before this module is imported.
"""
import math
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # keep the module importable, so check_supported can say what is missing
    # Stand-ins just rich enough for the decorators and annotations below to run at import time.
    triton = SimpleNamespace(jit=lambda fn: fn, autotune=lambda **kw: (lambda fn: fn), Config=lambda *a, **kw: None)
    tl = SimpleNamespace(constexpr=None)
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

# @triton.jit picks the interpreter when it decorates, i.e. when this module is imported: the
# variable cannot be switched on afterwards, so read it once here as well.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# tl.arange spans the head dim unmasked, so D must be a power of two; 64 is MiniCPM's head dim.
HEAD_DIMS = (32, 64, 128)
# exp(x) = exp2(x * log2 e), and exp2 is the GPU's native instruction: log2(e) is folded into the
# softmax scale once (qk_scale = sm_scale * LOG2E), so every score and L are in log2 units.
LOG2E = 1.4426950408889634


def _configs(tiles, interpreted):
    """{head dim: [(BLOCK_M, BLOCK_N, num_warps, num_stages)]} -> the autotune configs of all head dims."""
    # The interpreter gets one small tile (quick tests, nothing to tune), unequal like the GPU ones so
    # the tests exercise block boundaries that do not line up between queries and keys.
    shapes = [interpreted] if INTERPRET else sorted({t for ts in tiles.values() for t in ts})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _tiles_for(tiles, head_dim):
    """The tiles tried at this head dim: head dims up to 64 share the 64 list (32 needs fewer registers)."""
    return tiles[64 if head_dim <= 64 else 128]


def _per_head_dim(tiles):
    """autotune's prune_configs_by: a launch times only its own head dim's tiles."""
    def prune(configs, named_args, **kwargs):
        keep = _tiles_for(tiles, kwargs["HEAD_DIM"])
        return [c for c in configs if INTERPRET or (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                    c.num_stages) in keep]
    return {"early_config_prune": prune}


# Tuning candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages), per head dim. The key includes T_BUCKET
# (the key length rounded up to a power of two) so decoding, where Tk grows by one every step, does
# not re-tune at every step.
# Tiling: a program keeps its own tiles on chip for its whole life and streams the other side's blocks
# past them; the kept side is the wide one, since each streamed block is reused by every kept row. The
# forward and dQ keep a query tile (BLOCK_M) and stream K, V; dK/dV keeps K, V, dK, dV (four tiles of
# BLOCK_N rows) and streams Q, dO. num_stages > 1 prefetches the next streamed block.
# Every tile below compiles for sm_80 and sm_90 without spilling registers and within the block's shared
# memory (`python tools/aot.py` checks it, tests/test_aot.py in CI). Where an earlier tile spilled
# (a stack frame at 255 registers), the comment says what replaced it. More warps split a tile's
# registers over more threads; fewer stages keep fewer streamed blocks in flight; smaller tiles hold less.
_FWD_TILES = {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],  # all clean
    128: [(128, 64, 8, 3),   # (128, 64, 4, 3) spilled on both targets: 8 warps halve the registers per thread
          (128, 32, 8, 3),   # (128, 32, 4, 4) spilled on sm_80: 8 warps, one stage less
          (64, 128, 8, 2),   # (128, 128, 8, 3) spilled on sm_80 (and used 225 KB on sm_90): half the query tile
          (64, 64, 8, 3)],   # (64, 64, 4, 4) sat at 255 registers on sm_80: 8 warps leave a margin
}
_DKDV_TILES = {   # the most register-hungry kernel: four [BLOCK_N, D] tiles live across the whole loop
    64: [(32, 128, 8, 3),    # (32, 128, 4, 4) spilled on both targets (296 B on sm_90): 8 warps, one stage less
         (32, 128, 8, 2),    # (64, 128, 8, 3) spilled on sm_80: the same key block with a smaller query tile
         (32, 64, 4, 3),     # (32, 64, 4, 4) spilled on sm_80: one stage less
         (64, 32, 4, 3)],    # (64, 64, 4, 3) spilled on both: half the key block
    128: [(16, 128, 8, 2),   # head dim 128: 4 warps spilled beyond 32-row key blocks, and every tile tried
          (32, 64, 8, 2),    # with 3+ stages spilled. Hence 8 warps, 2 stages (1 for 64 x 64), and
                             # streamed query tiles of 16 to 64 rows under key blocks of 32 to 128
          (64, 64, 8, 1),
          (32, 32, 8, 2)],
}
_DQ_TILES = {
    64: [(128, 32, 4, 4),    # clean (255 registers on sm_80, without a stack frame)
         (128, 32, 8, 3),    # (128, 64, 8, 3) spilled on sm_80: half the key block
         (64, 32, 4, 4),     # clean
         (32, 64, 4, 3)],    # (64, 64, 4, 3) spilled on sm_80: half the query tile
    128: [(64, 64, 8, 3),    # (64, 64, 4, 3) sat at 255 registers on sm_80: 8 warps
          (64, 32, 4, 4),    # clean; (128, 32, 4, 4) spilled on sm_80: half the query tile
          (32, 128, 8, 2),   # (128, 64, 8, 3) spilled on sm_80 (280 B): a narrow query tile, wide key block
          (32, 64, 4, 3)],   # a small 4-warp tile, the cheapest when there are many heads to fill the GPU
}
_FWD_CONFIGS = _configs(_FWD_TILES, interpreted=(32, 16, 1, 1))
_DKDV_CONFIGS = _configs(_DKDV_TILES, interpreted=(16, 32, 1, 1))   # a key block per program
_DQ_CONFIGS = _configs(_DQ_TILES, interpreted=(32, 16, 1, 1))       # a query block per program
_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "T_BUCKET"]   # head dim, masking and length decide the best tile
DELTA_BLOCK = 64   # rows per program of the delta kernel, a plain row reduction: nothing to autotune


# ----------------------------------------------------------------------------------------- forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, lo, hi, Tk, off, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Online softmax over the key blocks [lo, hi). acc [BLOCK_M, D] fp32, l_i, m_i [BLOCK_M] fp32."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # K is read transposed through its strides, so Q K^T is a plain [M, D] x [D, N] tl.dot.
        kT_ptrs = K + offs_n[None, :] * skt + offs_d[:, None]                   # [D, BLOCK_N]
        v_ptrs = V + offs_n[:, None] * svt + offs_d[None, :]                    # [BLOCK_N, D]
        if MASKED:  # the diagonal / tail blocks: keys past Tk or in the future get probability 0
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < Tk, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
            s = tl.dot(q, kT) * qk_scale                                        # [BLOCK_M, BLOCK_N]
            keep = offs_n[None, :] < Tk  # padded keys load K = 0, a score of 0, not "absent": mask them
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + off)      # bottom-right aligned
            s = tl.where(keep, s, float("-inf"))  # exp2(-inf - m) = 0: masked keys get exactly 0
        else:       # every key of the block is visible to every query of the tile
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
            s = tl.dot(q, kT) * qk_scale
        # Online softmax (Dao 2023, Algorithm 1): subtracting the running max keeps every exp2 <= 1, so
        # large scores cannot overflow. Key 0 is visible to every row and is in the first block
        # visited, so m_new is never -inf (a fully masked row would give -inf - -inf = NaN).
        m_new = tl.maximum(m_i, tl.max(s, 1))                                   # [BLOCK_M]
        p = tl.math.exp2(s - m_new[:, None])                                    # [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2(m_i - m_new)        # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)         # first block: alpha = exp2(-inf) = 0, l_i was 0
        # P goes to the input dtype for a tensor-core matmul; the sum stays fp32 in acc. acc is left
        # unnormalised: dividing by l once at the end saves a division per block (Dao 2023, §3.1.1).
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_per_head_dim(_FWD_TILES))
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
              Hq, Tq, Tk, GROUPS, qk_scale, T_BUCKET,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Tq, BLOCK_M), B * Hq). Q, O [B, Hq, Tq, D]; K, V [B, Hkv, Tk, D]; LSE [B, Hq, Tq] fp32."""
    # Programs split the sequence as well as batch x heads (Dao 2023, §3.2), so a small batch of
    # long sequences still fills the GPU. Query tiles are independent: no communication at all.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // Hq).to(tl.int64), bh % Hq      # int64: b * stride overflows int32 on big tensors
    # GQA: GROUPS consecutive query heads share a KV head, the order repeat_interleave gives (_eager).
    hk = h // GROUPS                             # the KV head this query head reads (GQA)
    Q += b * sqb + h * sqh
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    O += b * sob + h * soh
    # Causal masking is bottom-right aligned: with Tq queries over Tk keys the queries are the LAST Tq
    # positions (decoding with a KV cache), so query i sees key j iff j <= i + off.
    off = Tk - Tq                                # 0 in training, where Tq = Tk

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Tq                           # the last tile may run past Tq; those rows are never stored
    q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=in_q[:, None], other=0.0)   # [BLOCK_M, D]

    # Running row max, row sum of exp2(s - max) and unnormalised output: fp32 whatever the input dtype.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Causal blocks strictly below the diagonal need no mask, blocks above it are skipped, and only the
    # diagonal (and tail) blocks pay for masking (Dao 2023, §3.1.1). Keys below full_end are visible to
    # the tile's first query, hence to all of them; its last query sees up to key start_m + BLOCK_M - 1 + off.
    if CAUSAL:
        full_end = (start_m + off + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(Tk, start_m + BLOCK_M + off)
    else:                                        # no diagonal: only a partial last block needs the Tk mask
        full_end = Tk // BLOCK_N * BLOCK_N
        hi = Tk
    # MASKED is a constexpr, so each call compiles its own loop: the full blocks run without the
    # per-score compare and select, which is most of the work for long sequences.
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, 0, full_end, Tk, off, qk_scale,
                               BLOCK_N, HEAD_DIM, False, CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, skt, svt, offs_m, full_end, hi, Tk, off, qk_scale,
                               BLOCK_N, HEAD_DIM, True, CAUSAL)

    tl.store(O + offs_m[:, None] * sot + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=in_q[:, None])                 # the one normalisation, O = acc / l
    # L = m + log2(l) = log2 sum_j exp2(s_j): one number per row instead of both m and l (Dao 2023,
    # §3.1.1), and all the backward needs to rebuild normalised P = exp2(s - L) without the T x T matrix.
    tl.store(LSE + bh * Tq + offs_m, m_i + tl.math.log2(l_i), mask=in_q)   # log2 units


# ---------------------------------------------------------------------------------------- backward

@triton.jit
def _bwd_delta(O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, Hq, Tq,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """DELTA[b, h, i] = sum_d dO * O, the row term in dS = P * (dP - DELTA). Grid (cdiv(Tq, BLOCK_M), B*Hq)."""
    # The softmax backward needs sum_j P_ij dP_ij per row; since O = P V that equals dO_i . O_i, a
    # D-long dot product instead of a Tk-long sum over recomputed tiles (Dao 2023, Algorithm 2). Done
    # once here, in fp32, because both backward kernels subtract it from dP.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b, h = (bh // Hq).to(tl.int64), bh % Hq
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_m < Tq)[:, None]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + bh * Tq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < Tq)


# In both backward kernels loads past Tq / Tk read zeros. That alone keeps the padding harmless:
# a padded query row has dO = 0 and Q = 0 (so adds nothing to dV, dK); a padded key row has K = 0
# (so adds nothing to dQ), and padded rows of dK, dV, dQ are never stored. Only the causal mask is
# applied explicitly, and only on blocks that straddle the diagonal.

@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, sqt, sdt, offs_n, lo, hi, Tq, off, qk_scale,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dK, dV [BLOCK_N, D] of one key block over the query blocks [lo, hi) of one head.
    Scores are computed transposed (keys as rows) so dK, dV come out without transposing them."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < Tq                       # padded queries read zeros: harmless, see above
        q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=in_q[:, None], other=0.0)    # [BLOCK_M, D]
        do = tl.load(DO + offs_m[:, None] * sdt + offs_d[None, :], mask=in_q[:, None], other=0.0)  # [BLOCK_M, D]
        lse = tl.load(LSE + offs_m, mask=in_q, other=0.0)                                          # [BLOCK_M]
        delta = tl.load(DELTA + offs_m, mask=in_q, other=0.0)                                      # [BLOCK_M]
        # Recompute P rather than store it: one more matmul per tile instead of a T x T tensor in
        # memory (Dao 2023, §3.1.2). With L from the forward, exp2(s - L) is already normalised.
        pT = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])      # [BLOCK_N, BLOCK_M]
        if MASKED:                               # diagonal tiles: key j > query i + off gets P = 0
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + off, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)                                      # dV += P^T dO
        dpT = tl.dot(v, tl.trans(do))                                             # (dO V^T)^T
        dsT = pT * (dpT - delta[None, :])                                         # softmax backward
        dk = tl.dot(dsT.to(q.dtype), q, dk)                                       # dK += dS^T Q
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by=_per_head_dim(_DKDV_TILES))
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                   sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
                   Hq, Hkv, Tq, Tk, GROUPS, qk_scale, sm_scale, T_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Tk, BLOCK_N), B * Hkv): one key block of one KV head, summed over its GROUPS query heads."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, hk = (bh // Hkv).to(tl.int64), bh % Hkv   # int64 as in the forward: offsets overflow int32
    off = Tk - Tq                                # the same bottom-right causal alignment as the forward
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = (offs_n < Tk)[:, None]
    # This block's K and V are read once and stay on chip while every query tile streams past.
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=in_k, other=0.0)  # [N, D]
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=in_k, other=0.0)  # [N, D]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)   # fp32 sums over all query tiles and heads
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    q_end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M       # rounded up: the partial last query tile is visited too
    if CAUSAL:
        # Query i sees key j iff i + off >= j: queries before lo see none of this block, queries
        # from diag_end on see all of it, and the tiles in between straddle the diagonal.
        lo = tl.maximum(start_n - off, 0) // BLOCK_M * BLOCK_M
        diag_end = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M, q_end)
    else:                                        # every query sees every key: no masked tiles
        lo = 0
        diag_end = 0
    # GQA without atomics: this program owns the KV head's dK, dV rows and loops over the GROUPS query
    # heads that read it, so repeated K/V is never materialised and no two programs write one row.
    for g in range(GROUPS):
        h = hk * GROUPS + g                      # the inverse of hk = h // GROUPS in the forward
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        row = (b * Hq + h) * Tq                    # LSE and DELTA are [B, Hq, Tq] contiguous
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, sqt, sdt, offs_n,
                             lo, diag_end, Tq, off, qk_scale, BLOCK_M, HEAD_DIM, True)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, sqt, sdt, offs_n,
                             diag_end, q_end, Tq, off, qk_scale, BLOCK_M, HEAD_DIM, False)
    # S = sm_scale * Q K^T, so dK = sm_scale * dS^T Q: the scale is applied once here, not per tile.
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=in_k)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=in_k)  # no scale: dV = P^T dO


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, lo, hi, Tk, off, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate dQ [BLOCK_M, D] of one query tile over the key blocks [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_k = (offs_n < Tk)[None, :]            # padded keys read K = 0: they add nothing to dQ
        kT = tl.load(K + offs_n[None, :] * skt + offs_d[:, None], mask=in_k, other=0.0)   # [D, BLOCK_N]
        vT = tl.load(V + offs_n[None, :] * svt + offs_d[:, None], mask=in_k, other=0.0)   # [D, BLOCK_N]
        p = tl.math.exp2(tl.dot(q, kT) * qk_scale - lse[:, None])  # recomputed P, [BLOCK_M, BLOCK_N]
        if MASKED:                               # only the diagonal blocks, as in the forward
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + off, p, 0.0)
        ds = p * (tl.dot(do, vT) - delta[:, None])                                        # dS = P * (dP - D)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)                                   # dQ += dS K
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by=_per_head_dim(_DQ_TILES))
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                 sdqb, sdqh, sdqt, Hq, Tq, Tk, GROUPS, qk_scale, sm_scale, T_BUCKET,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Tq, BLOCK_M), B * Hq): one query tile, the key blocks split as in the forward."""
    # Dao 2023 (§3.2) has the key-block programs add into dQ with atomics; a second pass that owns each
    # query tile recomputes P once more instead, but needs no atomics and gives a deterministic dQ.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // Hq).to(tl.int64), bh % Hq
    hk = h // GROUPS                             # GQA: the same query -> KV head map as the forward
    off = Tk - Tq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Tq                           # padded query rows read Q = dO = 0 and are never stored
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=in_q[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=in_q[:, None], other=0.0)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=in_q, other=0.0)       # [BLOCK_M], once for all key blocks
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=in_q, other=0.0)   # [BLOCK_M]
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:                                   # the forward's split: full blocks, then diagonal ones
        full_end = (start_m + off + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(Tk, start_m + BLOCK_M + off)
    else:
        full_end = Tk // BLOCK_N * BLOCK_N
        hi = Tk
    dq = _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, 0, full_end, Tk, off, qk_scale,
                   BLOCK_N, HEAD_DIM, False)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, skt, svt, offs_m, full_end, hi, Tk, off, qk_scale,
                   BLOCK_N, HEAD_DIM, CAUSAL)  # non-causal tail: no mask needed, padded K = 0
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=in_q[:, None])  # dQ = sm_scale * dS K


# ------------------------------------------------------------------------------------ Python side

def _s(t):
    """Batch, head and time strides; the kernels assume the head-dim stride is 1."""
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()   # copy only when the head dim is strided


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        o = torch.empty_like(q)   # same strides as q: a [B, T, H, D] layout viewed as [B, H, T, D] stays so
        lse = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)   # contiguous: row bh*Tq + i
        grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)      # BLOCK_M is the autotuner's pick
        _attn_fwd[grid](q, k, v, o, lse, *_s(q), *_s(k), *_s(v), *_s(o),
                        Hq, Tq, Tk, Hq // Hkv, sm_scale * LOG2E, triton.next_power_of_2(Tk),
                        HEAD_DIM=D, CAUSAL=causal)
        ctx.save_for_backward(q, k, v, o, lse)   # O(T) per head: O and L, never the T x T probabilities
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = _unit_last(do)
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        delta = torch.empty_like(lse)            # rowsum(dO * O), laid out like L
        block = 16 if INTERPRET else DELTA_BLOCK
        _bwd_delta[(triton.cdiv(Tq, block), B * Hq)](o, do, delta, *_s(o), *_s(do), Hq, Tq,
                                                       HEAD_DIM=D, BLOCK_M=block)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scales = (ctx.sm_scale * LOG2E, ctx.sm_scale, triton.next_power_of_2(Tk))
        grid = lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)    # KV heads, not query heads
        _attn_bwd_dkdv[grid](q, k, v, do, dk, dv, lse, delta, *_s(q), *_s(k), *_s(v), *_s(do), *_s(dk), *_s(dv),
                             Hq, Hkv, Tq, Tk, Hq // Hkv, *scales, HEAD_DIM=D, CAUSAL=ctx.causal)
        grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)
        _attn_bwd_dq[grid](q, k, v, do, dq, lse, delta, *_s(q), *_s(k), *_s(v), *_s(do), *_s(dq),
                           Hq, Tq, Tk, Hq // Hkv, *scales, HEAD_DIM=D, CAUSAL=ctx.causal)
        return dq, dk, dv, None, None            # causal and sm_scale get no gradient


def check_supported(q: torch.Tensor) -> None:
    """Raise RuntimeError with one clear line when the kernel cannot run on q."""
    if not HAVE_TRITON:
        raise RuntimeError("attn 'triton' needs the triton package (pip install triton); use --attn sdpa")
    if q.is_cuda:
        if INTERPRET:
            raise RuntimeError("attn 'triton': TRITON_INTERPRET=1 is set, which runs kernels on CPU tensors only")
        if q.dtype not in (torch.bfloat16, torch.float16):   # the 16-bit tensor-core tiles tuned above
            raise RuntimeError(f"attn 'triton' on CUDA takes bfloat16 or float16, got {q.dtype}")
    elif not INTERPRET:
        raise RuntimeError(f"attn 'triton' needs a CUDA GPU (got a {q.device.type} tensor); use --attn sdpa, "
                           "or set TRITON_INTERPRET=1 before importing kernels to run it slowly on CPU in fp32")
    elif q.dtype != torch.float32:
        raise RuntimeError(f"attn 'triton' under TRITON_INTERPRET=1 takes float32 CPU tensors, got {q.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise RuntimeError(f"attn 'triton' supports head dims {HEAD_DIMS}, got {q.shape[-1]}")


def flash_attention(q, k, v, causal: bool = True, sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * sm_scale, causal mask) v without materialising the scores; differentiable.
    q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D], Hq % Hkv == 0 (query head h reads KV head h // (Hq // Hkv)),
    Tq <= Tk (the queries are the last Tq positions). Returns [B, Hq, Tq, D] in q's dtype."""
    check_supported(q)
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1] != 0:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} does not fit k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Tq > k.shape[2]:  # off = Tk - Tq < 0 would hide key 0 from the first queries: NaN rows
        raise ValueError(f"flash_attention: more queries ({Tq}) than keys ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError("flash_attention: q, k, v must share dtype and device")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale   # the usual 1/sqrt(d) by default
    return FlashAttention.apply(q, k, v, causal, sm_scale)

