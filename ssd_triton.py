"""
The fused Mamba-2 mixer for short sequences, as Triton kernels: MedSora's fast path on the GPU.

What it computes is `ssm.Mamba2.forward_planes` on the readable path (chunked or recurrent scan): for every
sequence of a table (a row of token positions in scan order, e.g. one spiral of Eq. 8 or one token's frames,
Eq. 10), scan it forward and backward with one Mamba-2 layer and sum the two outputs in place. One program
holds whole sequences (up to 128 steps; several short ones are packed into one block of BLOCK steps) and all
heads, so it fuses, per sequence and direction:

    the gather of the projected tokens in scan order (through the table, never copied),
    the causal depthwise convolution and SiLU,   softplus(dt + dt_bias),
    the SSD scan as one masked product (C B^T * decay)(dt x) + D x   (Eq. 4 on a single chunk),
    the gate y * silu(z), RMSNorm over the E channels and its weight,   the sum of both directions.

`in_proj` and `out_proj` run as cuBLAS products around it, inside one autograd op. For the backward pass it keeps
the layer's input, each direction's gated output g = y silu(z) in the input's dtype, the norm's 1 / RMS per
token and the C.B scores; the backward kernel recomputes the rest (the convolution, the scan) from the
projection, which is redone there (one product). Keeping g means the norm's backward needs no second scan.

Equal to: ssm.Mamba2.forward_planes(..., scan="chunked") within bf16 / tf32 rounding (tests/test_ssd_triton.py
runs both, forward and gradients, on the CPU under Triton's interpreter, TRITON_INTERPRET=1; tests/test_gpu.py
on a GPU). Limits: ngroups = 1, head dim and state size powers of two >= 16, sequences of <= 128 steps; ssm.py
takes the readable path otherwise.

Dimension names: T tokens (all samples), P = 2E + 2N + nh projected channels, E inner width, nh heads,
hd head dim, N state size, K convolution width, S sequences of a table, L their length, BLOCK steps a program.
"""

import os

import torch
import triton
import triton.language as tl

MAX_LEN = 128  # the longest sequence one program holds


@triton.jit
def _setup(TABLE, n_seq, S, T_s, L, BLOCK: tl.constexpr):
    """This program's block of sequences: for each of its BLOCK steps the sequence, the step within it, whether it
    exists and its token row (int64); and the (BLOCK, BLOCK) masks of the two scan directions."""
    i = tl.arange(0, BLOCK)
    seg = i // L  # which of the program's BLOCK // L sequences
    seq = tl.program_id(0) * (BLOCK // L) + seg
    step = i - seg * L
    ok = (seg < BLOCK // L) & (seq < n_seq)
    rows = tl.load(TABLE + (seq % S) * L + step, mask=ok, other=0)  # the table holds positions within a sample
    rows = (seq // S).to(tl.int64) * T_s + rows.to(tl.int64)
    same = (seg[:, None] == seg[None, :]) & ok[:, None] & ok[None, :]
    causal = same & (i[None, :] <= i[:, None])  # [i, j]: j is i or before it in i's sequence
    anti = same & (i[None, :] >= i[:, None])
    return seq, step, ok, rows, causal, anti


@triton.jit
def _tile(P, rows, ok, stride_p, cols):
    """P[rows, cols]: (BLOCK, len(cols)), zero where a step does not exist."""
    return tl.load(P + rows[:, None] * stride_p + cols[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _rows_at(TABLE, seq, step, ok, S, T_s, L, s):
    """The rows of the steps s earlier (s < 0: later) in each step's sequence, and which of them exist."""
    src = step - s
    m = ok & (src >= 0) & (src < L)
    r = tl.load(TABLE + (seq % S) * L + src, mask=m, other=0)
    return (seq // S).to(tl.int64) * T_s + r.to(tl.int64), m


@triton.jit
def _conv(P, stride_p, TABLE, seq, step, ok, S, T_s, X, cols, CONV_W, CONV_B, chan, L, K: tl.constexpr, SIGN):
    """The depthwise convolution along the scan of xBC channels `chan` (P's columns `cols`, whose tile at this
    block's rows is X), before SiLU: (BLOCK, len(chan)). SIGN = 1: the forward scan (tap k sees step
    i - (K-1-k)); SIGN = -1: the backward scan (step i + (K-1-k)). The other taps' inputs are gathered through
    the table."""
    acc = tl.load(CONV_B + chan)[None, :] + X.to(tl.float32) * tl.load(CONV_W + chan * K + K - 1)[None, :]
    for k in range(K - 1):
        r, m = _rows_at(TABLE, seq, step, ok, S, T_s, L, SIGN * (K - 1 - k))
        xk = tl.load(P + r[:, None] * stride_p + cols[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        acc += xk * tl.load(CONV_W + chan * K + k)[None, :]
    return acc


@triton.jit
def _conv_backward(P, stride_p, TABLE, seq, step, ok, S, T_s, X, cols, dp, SCR, CONV_W, chan, L, K: tl.constexpr,
                   SIGN):
    """Gradients of _conv given those of its output (dp: (BLOCK, len(chan))): of the input tile, of the weight as a
    (K, len(chan)) tensor, and of the bias. dX[j] = sum_k w_k dp[j + s_k] reads other steps' dp, so dp goes
    through this program's scratch SCR (BLOCK, len(chan))."""
    i = tl.arange(0, dp.shape[0])
    c = tl.arange(0, dp.shape[1])
    kk = tl.arange(0, K)
    tl.store(SCR + i[:, None] * dp.shape[1] + c[None, :], dp)
    tl.debug_barrier()  # the other threads' stores are visible below
    dX = dp * tl.load(CONV_W + chan * K + K - 1)[None, :]
    dw = tl.where(kk[:, None] == K - 1, tl.sum(X.to(tl.float32) * dp, 0)[None, :], 0.0)
    for k in range(K - 1):
        s = SIGN * (K - 1 - k)
        m = ok & (step + s >= 0) & (step + s < L)
        g = tl.load(SCR + (i + s)[:, None] * dp.shape[1] + c[None, :], mask=m[:, None], other=0.0)  # dp[j + s]
        dX += g * tl.load(CONV_W + chan * K + k)[None, :]
        r, mr = _rows_at(TABLE, seq, step, ok, S, T_s, L, s)
        xk = tl.load(P + r[:, None] * stride_p + cols[None, :], mask=mr[:, None], other=0.0).to(tl.float32)
        dw += tl.where(kk[:, None] == k, tl.sum(dp * xk, 0)[None, :], 0.0)
    tl.debug_barrier()  # all reads done before the scratch is written again
    return dX, dw, tl.sum(dp, 0)


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _dsilu(x):
    s = tl.sigmoid(x)
    return s * (1 + x * (1 - s))


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1 + tl.exp(x)))  # torch's threshold


@triton.jit
def _cb(P, stride_p, TABLE, seq, step, ok, S, T_s, rows, CONV_W, CONV_B, mask, E: tl.constexpr, N: tl.constexpr,
        L, K: tl.constexpr, BLOCK: tl.constexpr, NC: tl.constexpr, SIGN):
    """C_i . B_j of one direction (B and C after the convolution and SiLU), masked: (BLOCK, BLOCK). Summed over
    slices of NC state channels, which keeps few values of B and C alive at once."""
    dtype = P.dtype.element_ty
    CB = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for c0 in range(0, N, NC):
        cn = E + c0 + tl.arange(0, NC)  # B's channels in xBC; C's are N further
        Bs = _silu(_conv(P, stride_p, TABLE, seq, step, ok, S, T_s, _tile(P, rows, ok, stride_p, E + cn), E + cn,
                         CONV_W, CONV_B, cn, L, K, SIGN))
        Cs = _silu(_conv(P, stride_p, TABLE, seq, step, ok, S, T_s, _tile(P, rows, ok, stride_p, E + cn + N),
                         E + cn + N, CONV_W, CONV_B, cn + N, L, K, SIGN))
        CB += tl.dot(Cs.to(dtype), tl.trans(Bs.to(dtype)))
    return tl.where(mask, CB, 0.0)


@triton.jit
def _head(P, stride_p, rows, ok, DT_BIAS, A_LOG, DSKIP, h, E: tl.constexpr, N: tl.constexpr):
    """One head's step sizes for a block of sequences: dt (after softplus) and its raw input, the log-decays
    a = dt A (Eq. 3), their cumulative sum, A and D."""
    dt_raw = tl.load(P + rows * stride_p + 2 * E + 2 * N + h, mask=ok, other=0.0).to(tl.float32)
    dt = tl.where(ok, _softplus(dt_raw + tl.load(DT_BIAS + h)), 0.0)  # (BLOCK,), > 0
    A = -tl.exp(tl.load(A_LOG + h))
    a = dt * A
    return dt_raw, dt, a, tl.cumsum(a, 0), A, tl.load(DSKIP + h)  # cs[i] - cs[j] = a[j+1] + ... + a[i]


@triton.jit
def _decay(a, cs, mask, SIGN):
    """exp of the summed log-decays from step j to step i, masked: (BLOCK, BLOCK). Forward (SIGN 1): j <= i, by
    a[j+1] + ... + a[i]; backward (SIGN -1): j >= i, by a[i] + ... + a[j-1]."""
    ce = cs - a
    expo = tl.where(SIGN == 1, cs[:, None] - cs[None, :], ce[None, :] - ce[:, None])
    return tl.where(mask, tl.exp(tl.where(mask, expo, 0.0)), 0.0)


@triton.jit
def _scan(P, stride_p, TABLE, seq, step, ok, S, T_s, X, dt, Dh, Sc, CONV_W, CONV_B, ch, E: tl.constexpr, L,
          K: tl.constexpr, SIGN):
    """One slice of a head's channels, one direction: the convolution of the x tile X before SiLU, and
    y = Sc (dt s) + D s with s = silu(conv X) and Sc = CB * decay the head's scores: Eq. 4 on a single chunk."""
    xc = _conv(P, stride_p, TABLE, seq, step, ok, S, T_s, X, E + ch, CONV_W, CONV_B, ch, L, K, SIGN)
    s = _silu(xc)
    return xc, tl.dot(Sc, (s * dt[:, None]).to(X.dtype)) + Dh * s


@triton.jit
def _store_grad(DP, rows, ok, stride_p, cols, g, ACCUMULATE):
    """DP[rows, cols] = g, or += g."""
    ptr = DP + rows[:, None] * stride_p + cols[None, :]
    if ACCUMULATE:
        g += tl.load(ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(ptr, g.to(DP.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _add_param(ptr, g):
    tl.store(ptr, tl.load(ptr) + g)


@triton.jit
def _bc_backward(P, prow, stride_p, TABLE, seq, step, ok, S, T_s, rows, CONV_W, CONV_B, dCB, cn, SCR, L,
                 E: tl.constexpr, N: tl.constexpr, NH: tl.constexpr, K: tl.constexpr, SIGN):
    """One direction's gradients of B and C (slice cn of B's channels in xBC; C's are N further), given those of
    their scores C_i . B_j, dCB: dC = dCB B, dB = dCB^T C, through SiLU and the convolution. Returns the tiles'
    gradients; adds the convolution's parameter gradients to this program's row."""
    dtype = P.dtype.element_ty
    C: tl.constexpr = E + 2 * N
    XB, XC = _tile(P, rows, ok, stride_p, E + cn), _tile(P, rows, ok, stride_p, E + cn + N)
    Bp = _conv(P, stride_p, TABLE, seq, step, ok, S, T_s, XB, E + cn, CONV_W, CONV_B, cn, L, K, SIGN)
    Cp = _conv(P, stride_p, TABLE, seq, step, ok, S, T_s, XC, E + cn + N, CONV_W, CONV_B, cn + N, L, K, SIGN)
    dBp = tl.dot(tl.trans(dCB).to(dtype), _silu(Cp).to(dtype)) * _dsilu(Bp)
    dCp = tl.dot(dCB.to(dtype), _silu(Bp).to(dtype)) * _dsilu(Cp)
    dXB, dwB, dbB = _conv_backward(P, stride_p, TABLE, seq, step, ok, S, T_s, XB, E + cn, dBp, SCR, CONV_W, cn, L,
                                   K, SIGN)
    dXC, dwC, dbC = _conv_backward(P, stride_p, TABLE, seq, step, ok, S, T_s, XC, E + cn + N, dCp, SCR, CONV_W,
                                   cn + N, L, K, SIGN)
    kk = tl.arange(0, K)[:, None]
    _add_param(prow + 3 * NH + cn, dbB)
    _add_param(prow + 3 * NH + cn + N, dbC)
    _add_param(prow + 3 * NH + C + cn[None, :] * K + kk, dwB)
    _add_param(prow + 3 * NH + C + (cn + N)[None, :] * K + kk, dwC)
    return dXB, dXC


@triton.jit
def _cb_ptrs(CB, BLOCK: tl.constexpr, d):
    """Where this program's (BLOCK, BLOCK) scores of direction d live in CB (programs, 2, BLOCK, BLOCK)."""
    i = tl.arange(0, BLOCK)
    return CB + (tl.program_id(0).to(tl.int64) * 2 + d) * BLOCK * BLOCK + i[:, None] * BLOCK + i[None, :]


# Programs: a block of sequences each, or (for the per-head kernels) a block of sequences and one head. Sizes that
# change with the input are not specialised on, so one compiled kernel serves every table shape.
@triton.jit(do_not_specialize=["n_seq", "S", "T_s", "L"])
def _cb_kernel(P, CB, TABLE, CONV_W, CONV_B, n_seq, S, T_s, stride_p, L, E: tl.constexpr, N: tl.constexpr,
               K: tl.constexpr, BLOCK: tl.constexpr, BIDIR: tl.constexpr, NC: tl.constexpr):
    """The scores C_i . B_j of both directions, shared by all heads (ngroups = 1)."""
    seq, step, ok, rows, causal, anti = _setup(TABLE, n_seq, S, T_s, L, BLOCK)
    CBf = _cb(P, stride_p, TABLE, seq, step, ok, S, T_s, rows, CONV_W, CONV_B, causal, E, N, L, K, BLOCK, NC, 1)
    tl.store(_cb_ptrs(CB, BLOCK, 0), CBf)
    if BIDIR:
        CBb = _cb(P, stride_p, TABLE, seq, step, ok, S, T_s, rows, CONV_W, CONV_B, anti, E, N, L, K, BLOCK, NC, -1)
        tl.store(_cb_ptrs(CB, BLOCK, 1), CBb)


@triton.jit(do_not_specialize=["n_seq", "S", "T_s", "n_tok", "L"])
def _scan_kernel(P, CB, G, SS, TABLE, CONV_W, CONV_B, DT_BIAS, A_LOG, DSKIP, n_seq, S, T_s, n_tok, stride_p,
                 stride_o, L, E: tl.constexpr, NH: tl.constexpr, HD: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                 BLOCK: tl.constexpr, BIDIR: tl.constexpr, HC: tl.constexpr):
    """One head of a block of sequences: g = y silu(z) of each direction into G (directions, n_tok, E), and the
    head's share of the RMSNorm's statistics (sums of squares of g) in SS (programs, NH, 2, BLOCK)."""
    seq, step, ok, rows, causal, anti = _setup(TABLE, n_seq, S, T_s, L, BLOCK)
    h = tl.program_id(1)
    dtype = P.dtype.element_ty
    dt_raw, dt, a, cs, A, Dh = _head(P, stride_p, rows, ok, DT_BIAS, A_LOG, DSKIP, h, E, N)
    Sf = (tl.load(_cb_ptrs(CB, BLOCK, 0)) * _decay(a, cs, causal, 1)).to(dtype)
    Sb = Sf
    if BIDIR:
        Sb = (tl.load(_cb_ptrs(CB, BLOCK, 1)) * _decay(a, cs, anti, -1)).to(dtype)
    stats = tl.zeros([2, BLOCK], dtype=tl.float32)  # sums of squares, forward and backward scan
    k2 = tl.arange(0, 2)[:, None]
    for c0 in range(0, HD, HC):
        ch = h * HD + c0 + tl.arange(0, HC)
        X = _tile(P, rows, ok, stride_p, E + ch)
        gate = _silu(_tile(P, rows, ok, stride_p, ch).to(tl.float32))
        xc, y = _scan(P, stride_p, TABLE, seq, step, ok, S, T_s, X, dt, Dh, Sf, CONV_W, CONV_B, ch, E, L, K, 1)
        stats += tl.where(k2 == 0, tl.sum(y * gate * y * gate, 1)[None, :], 0.0)
        _store_grad(G, rows, ok, stride_o, ch, y * gate, 0)
        if BIDIR:
            xc, y = _scan(P, stride_p, TABLE, seq, step, ok, S, T_s, X, dt, Dh, Sb, CONV_W, CONV_B, ch, E, L, K, -1)
            stats += tl.where(k2 == 1, tl.sum(y * gate * y * gate, 1)[None, :], 0.0)
            _store_grad(G + n_tok.to(tl.int64) * stride_o, rows, ok, stride_o, ch, y * gate, 0)
    i = tl.arange(0, BLOCK)[None, :]
    tl.store(SS + ((tl.program_id(0).to(tl.int64) * NH + h) * 2 + k2) * BLOCK + i, stats)


@triton.jit(do_not_specialize=["n_seq", "S", "T_s", "n_tok", "L"])
def _norm_kernel(OUT, G, SS, RSTD, NORM_W, TABLE, n_seq, S, T_s, n_tok, stride_o, eps, L, E: tl.constexpr,
                 NH: tl.constexpr, HD: tl.constexpr, BLOCK: tl.constexpr, BIDIR: tl.constexpr, HC: tl.constexpr):
    """One head's channels of a block of sequences: RMSNorm of each direction's g over all E channels, the norm's
    weight, the two directions summed, into OUT; each token's 1 / RMS of each direction into RSTD (2, n_tok)."""
    seq, step, ok, rows, causal, anti = _setup(TABLE, n_seq, S, T_s, L, BLOCK)
    k2 = tl.arange(0, 2)[:, None]
    i = tl.arange(0, BLOCK)[None, :]
    base = SS + tl.program_id(0).to(tl.int64) * NH * 2 * BLOCK
    stats = tl.zeros([2, BLOCK], dtype=tl.float32)
    for h in range(NH):
        stats += tl.load(base + (h * 2 + k2) * BLOCK + i)
    rf = tl.rsqrt(tl.sum(tl.where(k2 == 0, stats, 0.0), 0) / E + eps)
    rb = tl.rsqrt(tl.sum(tl.where(k2 == 1, stats, 0.0), 0) / E + eps)
    if tl.program_id(1) == 0:
        tl.store(RSTD + rows, rf, mask=ok)
        tl.store(RSTD + n_tok + rows, rb, mask=ok)
    for c0 in range(0, HD, HC):
        ch = tl.program_id(1) * HD + c0 + tl.arange(0, HC)
        out = _tile(G, rows, ok, stride_o, ch).to(tl.float32) * rf[:, None]
        if BIDIR:
            out += _tile(G + n_tok.to(tl.int64) * stride_o, rows, ok, stride_o, ch).to(tl.float32) * rb[:, None]
        _store_grad(OUT, rows, ok, stride_o, ch, out * tl.load(NORM_W + ch)[None, :], 0)


@triton.jit(do_not_specialize=["n_seq", "S", "T_s", "n_tok", "L", "ACCUMULATE"])
def _bwd_kernel(P, CB, DOUT, DP, RSTD, DD, DCB, DPARAM, SCR, TABLE, CONV_W, CONV_B, DT_BIAS, A_LOG, DSKIP, NORM_W,
                n_seq, S, T_s, n_tok, stride_p, stride_o, stride_param, L, ACCUMULATE, E: tl.constexpr,
                NH: tl.constexpr, HD: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
                BIDIR: tl.constexpr, HC: tl.constexpr):
    """Gradients of one head of a block of sequences, given each token's 1 / RMS of g (RSTD) and sum over the E
    channels of dout * w * g (DD), both (2, n_tok). Writes the head's channels of d(projection) to DP (added to what
    is there if ACCUMULATE); the gradient of the scores C_i . B_j to DCB (programs, NH, 2, BLOCK, BLOCK); and adds
    the head's parameter gradients to this block's row of DPARAM (zeroed): A_log, D, dt_bias (nh each), conv bias
    (C), conv weight (C*K)."""
    C: tl.constexpr = E + 2 * N
    dtype = P.dtype.element_ty
    seq, step, ok, rows, causal, anti = _setup(TABLE, n_seq, S, T_s, L, BLOCK)
    h = tl.program_id(1)
    prow = DPARAM + tl.program_id(0).to(tl.int64) * stride_param
    kk = tl.arange(0, K)[:, None]
    scr = SCR + (tl.program_id(0).to(tl.int64) * NH + h) * BLOCK * HC  # this program's scratch
    dt_raw, dt, a, cs, A, Dh = _head(P, stride_p, rows, ok, DT_BIAS, A_LOG, DSKIP, h, E, N)
    # One direction after the other, the second adding to what the first wrote.
    for d in range(2 if BIDIR else 1):
        SIGN = 1 - 2 * d
        r = tl.load(RSTD + d * n_tok + rows, mask=ok, other=0.0)
        c = r * r * r * tl.load(DD + d * n_tok + rows, mask=ok, other=0.0) / E  # dg = r dn - r^3 g (dn . g) / E
        add = ACCUMULATE | d  # the second direction adds to the first
        Sc = (tl.load(_cb_ptrs(CB, BLOCK, d)) * _decay(a, cs, tl.where(d == 0, causal, anti), SIGN)).to(dtype)
        dS = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)  # of the scores, summed over the head's channels
        ddt = tl.zeros([BLOCK], dtype=tl.float32)  # through u = dt s
        dD = tl.sum(ddt, 0)
        for c0 in range(0, HD, HC):
            ch = h * HD + c0 + tl.arange(0, HC)
            X = _tile(P, rows, ok, stride_p, E + ch)
            z = _tile(P, rows, ok, stride_p, ch).to(tl.float32)
            gate = _silu(z)
            dout = _tile(DOUT, rows, ok, stride_o, ch).to(tl.float32)
            w = tl.load(NORM_W + ch)[None, :]
            xc, y = _scan(P, stride_p, TABLE, seq, step, ok, S, T_s, X, dt, Dh, Sc, CONV_W, CONV_B, ch, E, L, K, SIGN)
            dg = r[:, None] * dout * w - c[:, None] * y * gate
            _store_grad(DP, rows, ok, stride_p, ch, dg * y * _dsilu(z), add)  # z
            dy = dg * gate
            s = _silu(xc)
            u = (s * dt[:, None]).to(dtype)
            dS += tl.dot(dy.to(dtype), tl.trans(u))
            du = tl.dot(tl.trans(Sc), dy.to(dtype))
            dD += tl.sum(tl.sum(dy * s, 1), 0)
            ddt += tl.sum(du * s, 1)
            dp = (du * dt[:, None] + Dh * dy) * _dsilu(xc)  # of the convolution's output
            dX, dw, db = _conv_backward(P, stride_p, TABLE, seq, step, ok, S, T_s, X, E + ch, dp, scr, CONV_W, ch,
                                        L, K, SIGN)
            _store_grad(DP, rows, ok, stride_p, E + ch, dX, add)  # x
            _add_param(prow + 3 * NH + ch, db)
            _add_param(prow + 3 * NH + C + ch[None, :] * K + kk, dw)
        mask = tl.where(d == 0, causal, anti)
        decay = _decay(a, cs, mask, SIGN)  # again, and the scores below: fewer values kept through the loop
        CBd = tl.load(_cb_ptrs(CB, BLOCK, d))
        dS = tl.where(mask, dS, 0.0)
        i = tl.arange(0, BLOCK)
        tl.store(DCB + (((tl.program_id(0).to(tl.int64) * NH + h) * 2 + d) * BLOCK + i[:, None]) * BLOCK + i[None, :],
                 dS * decay)
        # The decays' exponent is cs_i - cs_j (forward) or (cs_j - a_j) - (cs_i - a_i) (backward); cs is a cumulative
        # sum within each sequence, so its gradient is the reversed cumulative sum.
        t = dS * CBd * decay
        dexp = (tl.sum(t, 1) - tl.sum(t, 0)) * SIGN
        da = tl.sum(tl.where(anti, dexp[None, :], 0.0), 1) - tl.where(SIGN == -1, dexp, 0.0)
        x = dt_raw + tl.load(DT_BIAS + h)
        ddt_raw = tl.where(ok, (ddt + da * A) * tl.where(x > 20.0, 1.0, tl.sigmoid(x)), 0.0)  # softplus' = sigmoid
        _add_param(prow + h, tl.sum(da * dt, 0) * A)  # A = -exp(A_log): dA_log = dA * A
        _add_param(prow + NH + h, dD)
        _add_param(prow + 2 * NH + h, tl.sum(ddt_raw, 0))  # dt_bias
        ptr = DP + rows * stride_p + 2 * E + 2 * N + h
        if add:
            ddt_raw += tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        tl.store(ptr, ddt_raw.to(DP.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n_seq", "S", "T_s", "L", "ACCUMULATE"])
def _bc_kernel(P, DCB, DP, DPARAM, SCR, TABLE, CONV_W, CONV_B, n_seq, S, T_s, stride_p, stride_param, L, ACCUMULATE,
               E: tl.constexpr, NH: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
               BIDIR: tl.constexpr, NC: tl.constexpr):
    """Gradients of B and C for a block of sequences, from those of their scores summed over the heads (DCB)."""
    seq, step, ok, rows, causal, anti = _setup(TABLE, n_seq, S, T_s, L, BLOCK)
    prow = DPARAM + tl.program_id(0).to(tl.int64) * stride_param
    i = tl.arange(0, BLOCK)
    for d in range(2 if BIDIR else 1):
        dCB = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for h in range(NH):
            dCB += tl.load(DCB + (((tl.program_id(0).to(tl.int64) * NH + h) * 2 + d) * BLOCK + i[:, None]) * BLOCK
                           + i[None, :])
        add = ACCUMULATE | d
        for n0 in range(0, N, NC):  # a slice of state channels at a time
            cn = E + n0 + tl.arange(0, NC)
            dXB, dXC = _bc_backward(P, prow, stride_p, TABLE, seq, step, ok, S, T_s, rows, CONV_W, CONV_B, dCB, cn,
                                    SCR + tl.program_id(0).to(tl.int64) * BLOCK * NC, L, E, N, NH, K, 1 - 2 * d)
            _store_grad(DP, rows, ok, stride_p, E + cn, dXB, add)
            _store_grad(DP, rows, ok, stride_p, E + cn + N, dXC, add)


@triton.jit(do_not_specialize=["n_tok"])
def _norm_bwd_kernel(G, RSTD, DOUT, NORM_W, Y, DD, DW, n_tok, E: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                     DIRS: tl.constexpr):
    """The RMSNorm's part of the backward pass for a block of BT tokens, from the kept g and 1 / RMS of each direction:
    the mixer's output again into Y (for out_proj's weight gradient), each token's sum over the channels of
    dout * w * g into DD (2, n_tok), and this block's share of the norm weight's gradient into its row of DW."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    ok = t < n_tok
    t64 = t.to(tl.int64)
    r0 = tl.load(RSTD + t, mask=ok, other=0.0)
    r1 = tl.load(RSTD + n_tok + t, mask=ok, other=0.0)
    dd0 = tl.zeros([BT], dtype=tl.float32)
    dd1 = tl.zeros([BT], dtype=tl.float32)
    for e0 in range(0, E, BE):
        c = e0 + tl.arange(0, BE)
        at = t64[:, None] * E + c[None, :]
        w = tl.load(NORM_W + c)[None, :]
        dout = tl.load(DOUT + at, mask=ok[:, None], other=0.0).to(tl.float32)
        g = tl.load(G + at, mask=ok[:, None], other=0.0).to(tl.float32)
        dd0 += tl.sum(dout * w * g, 1)
        normed = g * r0[:, None]
        if DIRS == 2:
            g = tl.load(G + n_tok.to(tl.int64) * E + at, mask=ok[:, None], other=0.0).to(tl.float32)
            dd1 += tl.sum(dout * w * g, 1)
            normed += g * r1[:, None]
        tl.store(Y + at, (normed * w).to(Y.dtype.element_ty), mask=ok[:, None])
        tl.store(DW + tl.program_id(0).to(tl.int64) * E + c, tl.sum(dout * normed, 0))
    tl.store(DD + t, dd0, mask=ok)
    tl.store(DD + n_tok + t, dd1, mask=ok)


# ---------------------------------------------------------------------------------------------------------
# Launching, and the autograd op around in_proj -> mixer -> out_proj
# ---------------------------------------------------------------------------------------------------------

MIN_BLOCK = 16  # steps a program holds at least: short sequences are packed BLOCK // L to a program
WARPS = {16: 4, 32: 4, 64: 8, 128: 8}  # by BLOCK: kernels over blocks of sequences
HEAD_WARPS = {16: 4, 32: 4, 64: 8, 128: 8}  # and over (block, head)
NORM_TOKENS = 16  # tokens a program of _norm_bwd_kernel holds
MAXNREG = None  # registers a thread of the per-head kernels may use (None: the compiler's choice)


def launch_settings(spec):
    """Launch settings "W" or "W:R" -> (W, R or None): the per-head kernels of blocks of 64 and 128 steps with W warps,
    and at most R registers a thread (None: the compiler's choice)."""
    warps, _, regs = spec.partition(":")
    if not warps.isdigit() or int(warps) not in (1, 2, 4, 8, 16) or (regs and not regs.isdigit()):
        raise ValueError(f"ssd_triton launch settings {spec!r}: expected W or W:R, W warps (1, 2, 4, 8 or 16), "
                         f"R registers")
    return int(warps), int(regs) if regs else None


def configure(spec):
    """Use launch settings "W" or "W:R" (launch_settings). experiments/mixer_tune.py measures them; the environment
    variable MEDSORA_SSD_TUNING sets one for any command."""
    global MAXNREG
    warps, MAXNREG = launch_settings(spec)
    for block in (64, 128):
        HEAD_WARPS[block] = warps


if os.environ.get("MEDSORA_SSD_TUNING"):
    configure(os.environ["MEDSORA_SSD_TUNING"])


def block_size(L):
    return max(MIN_BLOCK, triton.next_power_of_2(L))


def supported(E, nh, N, d_conv, ngroups, lengths):
    """Whether the kernels take this layer and these sequence lengths."""
    pow2 = lambda v: v >= 16 and v & (v - 1) == 0  # noqa: E731  (tl.arange and tl.dot need powers of two >= 16)
    return (ngroups == 1 and pow2(E // nh) and pow2(N) and d_conv & (d_conv - 1) == 0
            and all(1 <= L <= MAX_LEN for L in lengths))


def _meta(conv_w, dt_bias, norm_w):
    E, nh, C, K = norm_w.numel(), dt_bias.numel(), conv_w.shape[0], conv_w.shape[-1]
    N = (C - E) // 2
    # NC, HC: channels of B and C, and of a head, handled at a time (fewer values alive at once)
    return dict(E=E, NH=nh, HD=E // nh, N=N, K=K, NC=min(N, 32), HC=min(E // nh, 32))


def _launches(tables, planes, tokens, T):
    """Each plane's launches, plane after plane: lists of (table, n_seq, L, BLOCK, programs, at), each sample of
    T // tokens holding every table's sequences, and `at` where the table's C.B scores (programs, 2, BLOCK, BLOCK)
    start in one flat tensor of all of them; and that tensor's size."""
    at, out = 0, []
    for k in range(max(planes) + 1):
        out.append([])
        for table in (t for t, q in zip(tables, planes) if q == k):
            S, L = table.shape
            n_seq = (T // tokens) * S
            block = block_size(L)
            programs = triton.cdiv(n_seq, block // L)
            out[-1].append((table, n_seq, L, block, programs, at))
            at += programs * 2 * block * block
    return out, at


def _scores_of(scores, at, programs, block):
    """One table's C.B scores in the flat tensor of _launches."""
    return scores[at:at + programs * 2 * block * block].view(programs, 2, block, block)


def _forward(u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps, bidirectional):
    """The op's output (n_planes, T, D), and what the backward pass keeps: g of each plane and direction
    (n_planes, directions, T, E), 1 / RMS (n_planes, 2, T), and every table's C.B scores in one flat tensor."""
    meta = _meta(conv_w, dt_bias, norm_w)
    p = u @ in_w.t()  # (T, P): z, xBC, dt of every token
    T, E, nh = p.shape[0], meta["E"], meta["NH"]
    launches, size = _launches(tables, planes, tokens, T)
    g_all = torch.empty(len(launches), 2 if bidirectional else 1, T, E, dtype=p.dtype, device=p.device)
    rstd_all = torch.empty(len(launches), 2, T, dtype=torch.float32, device=p.device)
    scores = torch.empty(size, dtype=torch.float32, device=p.device)
    outs = []
    for k, plane in enumerate(launches):
        y, g, rstd = torch.empty(T, E, dtype=p.dtype, device=p.device), g_all[k], rstd_all[k]
        for table, n_seq, L, block, programs, at in plane:
            S, cb = table.shape[0], _scores_of(scores, at, programs, block)
            _cb_kernel[(programs,)](p, cb, table, conv_w, conv_b, n_seq, S, tokens, p.stride(0), L, BLOCK=block,
                                    BIDIR=bidirectional, num_warps=WARPS[block], E=E, N=meta["N"], K=meta["K"],
                                    NC=meta["NC"])
            ss = torch.empty(programs, nh, 2, block, dtype=torch.float32, device=p.device)
            m = {k: meta[k] for k in ("E", "NH", "HD", "N", "K", "HC")}
            _scan_kernel[(programs, nh)](p, cb, g, ss, table, conv_w, conv_b, dt_bias, A_log, D, n_seq, S, tokens, T,
                                         p.stride(0), E, L, BLOCK=block, BIDIR=bidirectional, **_head_launch(block),
                                         **m)
            _norm_kernel[(programs, nh)](y, g, ss, rstd, norm_w, table, n_seq, S, tokens, T, E, eps, L, E=E, NH=nh,
                                         HD=meta["HD"], BLOCK=block, BIDIR=bidirectional, HC=meta["HC"],
                                         num_warps=WARPS[block])
        outs.append(y @ out_w.t())
    return torch.stack(outs), g_all, rstd_all, scores


def _head_launch(block):
    """Launch settings of the kernels over (block of sequences, head)."""
    return dict(num_warps=HEAD_WARPS[block], **({"maxnreg": MAXNREG} if MAXNREG else {}))


def _backward(grad, u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps,
              bidirectional, g_all, rstd_all, scores):
    meta = _meta(conv_w, dt_bias, norm_w)
    E, nh, C, K = meta["E"], meta["NH"], conv_w.shape[0], meta["K"]
    p = u @ in_w.t()  # recomputed: the forward pass did not keep it
    T = p.shape[0]
    dp = torch.empty_like(p)
    d_out_w = torch.zeros_like(out_w, dtype=torch.float32)
    d_norm_w = torch.zeros(E, dtype=torch.float32, device=u.device)
    dparam = torch.zeros(3 * nh + C + C * K, dtype=torch.float32, device=u.device)
    for k, plane in enumerate(_launches(tables, planes, tokens, T)[0]):
        g, rstd = g_all[k], rstd_all[k]
        dy = grad[k] @ out_w  # (T, E): the gradient of the mixer's output
        y = torch.empty_like(dy)  # the mixer's output, for out_proj's weight gradient
        dd = torch.empty(2, T, dtype=torch.float32, device=u.device)
        token_blocks = triton.cdiv(T, NORM_TOKENS)
        dw = torch.empty(token_blocks, E, dtype=torch.float32, device=u.device)
        _norm_bwd_kernel[(token_blocks,)](g, rstd, dy, norm_w, y, dd, dw, T, E=E, BT=NORM_TOKENS, BE=min(E, 128),
                                          DIRS=g.shape[0], num_warps=4)
        d_norm_w += dw.sum(0)
        d_out_w += (grad[k].t() @ y).float()
        for table, n_seq, L, block, programs, at in plane:
            S = table.shape[0]
            part = torch.zeros(programs, dparam.numel(), dtype=torch.float32, device=u.device)
            dcb = torch.empty(programs, nh, 2, block, block, dtype=torch.float32, device=u.device)
            scr = torch.empty(programs, nh, block, max(meta["HC"], meta["NC"]), dtype=torch.float32, device=u.device)
            m = {k: meta[k] for k in ("E", "NH", "HD", "N", "K", "HC")}
            cb = _scores_of(scores, at, programs, block)
            _bwd_kernel[(programs, nh)](p, cb, dy, dp, rstd, dd, dcb, part, scr, table, conv_w, conv_b,
                                        dt_bias, A_log, D, norm_w, n_seq, S, tokens, T, p.stride(0), dy.stride(0),
                                        part.stride(0), L, int(k > 0), BLOCK=block, BIDIR=bidirectional,
                                        **_head_launch(block), **m)
            m = {k: meta[k] for k in ("E", "NH", "N", "K", "NC")}
            _bc_kernel[(programs,)](p, dcb, dp, part, scr, table, conv_w, conv_b, n_seq, S, tokens, p.stride(0),
                                    part.stride(0), L, int(k > 0), BLOCK=block, BIDIR=bidirectional,
                                    num_warps=WARPS[block], **m)
            dparam += part.sum(0)
    dA_log, dD, ddt_bias, dconv_b, dconv_w = dparam.split([nh, nh, nh, C, C * K])
    small = [g.view_as(w).to(w.dtype, copy=True) for g, w in ((dconv_w, conv_w), (dconv_b, conv_b),
             (ddt_bias, dt_bias), (dA_log, A_log), (dD, D), (d_norm_w, norm_w))]  # own memory, not views of dparam
    return (dp @ in_w, dp.t() @ u, *small, d_out_w.to(out_w.dtype))


@torch.library.custom_op("medsora::mamba_planes", mutates_args=())
def mamba_planes(u: torch.Tensor, in_w: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor,
                 dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor, norm_w: torch.Tensor,
                 out_w: torch.Tensor, tables: list[torch.Tensor], planes: list[int], tokens: int, eps: float,
                 bidirectional: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """u (T, D) -> (n_planes, T, D): out_proj(mixer(in_proj(u))) for each plane, a plane being the tables whose
    `planes` entry is its index; then the three tensors the backward pass keeps (_forward). `tokens`: tokens per
    sample; tables (S, L) int32 hold positions within a sample, and the tables of one plane hold every token of a
    sample exactly once."""
    with torch.autocast(u.device.type, enabled=False):
        return _forward(u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps,
                        bidirectional)


@mamba_planes.register_fake
def _(u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps, bidirectional):
    T, E, n_planes = u.shape[0], norm_w.numel(), max(planes) + 1
    return (u.new_empty(n_planes, T, out_w.shape[0]), u.new_empty(n_planes, 2 if bidirectional else 1, T, E),
            u.new_empty(n_planes, 2, T, dtype=torch.float32),
            u.new_empty(_launches(tables, planes, tokens, T)[1], dtype=torch.float32))


@torch.library.custom_op("medsora::mamba_planes_backward", mutates_args=())
def mamba_planes_backward(grad: torch.Tensor, u: torch.Tensor, in_w: torch.Tensor, conv_w: torch.Tensor,
                          conv_b: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
                          norm_w: torch.Tensor, out_w: torch.Tensor, tables: list[torch.Tensor], planes: list[int],
                          tokens: int, eps: float, bidirectional: bool, g_all: torch.Tensor, rstd_all: torch.Tensor,
                          scores: torch.Tensor) -> list[torch.Tensor]:
    with torch.autocast(u.device.type, enabled=False):
        return list(_backward(grad, u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes,
                              tokens, eps, bidirectional, g_all, rstd_all, scores))


@mamba_planes_backward.register_fake
def _(grad, u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps, bidirectional,
      g_all, rstd_all, scores):
    return [torch.empty_like(t) for t in (u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w)]


def _setup_context(ctx, inputs, output):
    u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps, bidirectional = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, *output[1:], *tables)
    ctx.args = (planes, tokens, eps, bidirectional)


def _autograd_backward(ctx, grad, *unused):
    u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, g_all, rstd_all, scores, *tables = ctx.saved_tensors
    grads = mamba_planes_backward(grad.contiguous(), u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w,
                                  tables, *ctx.args, g_all, rstd_all, scores)
    return (*grads, [None] * len(tables), None, None, None, None)


mamba_planes.register_autograd(_autograd_backward, setup_context=_setup_context)
