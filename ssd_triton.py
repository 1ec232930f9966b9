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

`in_proj` and `out_proj` run as cuBLAS products around it, inside one autograd op that keeps only the layer's
input for the backward pass: the backward kernel recomputes everything else from the projection, which is
redone there (one product), so a layer stores D values per token instead of the ~8 D of the readable path.

Equal to: ssm.Mamba2.forward_planes(..., scan="chunked") within bf16 / tf32 rounding (tests/test_ssd_triton.py
runs both, forward and gradients, on the CPU under Triton's interpreter, TRITON_INTERPRET=1; tests/test_gpu.py
on a GPU). Limits: ngroups = 1, head dim and state size powers of two >= 16, sequences of <= 128 steps; ssm.py
takes the readable path otherwise.

Dimension names: T tokens (all samples), P = 2E + 2N + nh projected channels, E inner width, nh heads,
hd head dim, N state size, K convolution width, S sequences of a table, L their length, BLOCK steps a program.
"""

import torch
import triton
import triton.language as tl

MAX_LEN = 128  # the longest sequence one program holds


@triton.jit
def _rows(TABLE, seq, step, ok, S, T_s, L: tl.constexpr):
    """Token rows (int64) of sequence `seq` at `step` (vectors), and which of them exist."""
    ok = ok & (step >= 0) & (step < L)
    r = tl.load(TABLE + (seq % S) * L + step, mask=ok, other=0)
    return (seq // S).to(tl.int64) * T_s + r.to(tl.int64), ok


@triton.jit
def _conv(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, chan, E: tl.constexpr, L: tl.constexpr,
          K: tl.constexpr, SIGN: tl.constexpr):
    """The depthwise convolution of xBC channels `chan` along the scan, before SiLU: (BLOCK, len(chan)).
    SIGN = 1: the forward scan (taps at steps i-K+1 .. i); SIGN = -1: the backward scan (i+K-1 .. i)."""
    acc = tl.load(CONV_B + chan).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        r, m = _rows(TABLE, seq, step + SIGN * (k - (K - 1)), ok, S, T_s, L)
        xk = tl.load(P + r[:, None] * stride_p + E + chan[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        acc = acc + xk * tl.load(CONV_W + chan * K + k).to(tl.float32)[None, :]
    return acc


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
def _head(P, stride_p, TABLE, seq, step, ok, rows, S, T_s, CONV_W, CONV_B, DT_BIAS, A_LOG, DSKIP, h, CBf, CBb,
          causal, anti, E: tl.constexpr, NH: tl.constexpr, HD: tl.constexpr, N: tl.constexpr, L: tl.constexpr,
          K: tl.constexpr, BIDIR: tl.constexpr):
    """One head of one block of sequences, both directions: what the forward and backward kernels share.
    Returns dt and its raw input, the decays a = dt A, the conv outputs of x before SiLU (xf, xb), the decay
    matrices (Lf, Lb), the scan outputs y (yf, yb, before the gate) and z."""
    dt_raw = tl.load(P + rows * stride_p + 2 * E + 2 * N + h, mask=ok, other=0.0).to(tl.float32)
    dt = tl.where(ok, _softplus(dt_raw + tl.load(DT_BIAS + h).to(tl.float32)), 0.0)  # (BLOCK,), > 0
    A = -tl.exp(tl.load(A_LOG + h).to(tl.float32))
    a = dt * A  # log-decay per step (Eq. 3)
    cs = tl.cumsum(a, 0)  # cs[i] - cs[j] = a[j+1] + ... + a[i]
    ch = h * HD + tl.arange(0, HD)
    Dh = tl.load(DSKIP + h).to(tl.float32)
    dtype = P.dtype.element_ty

    xf = _conv(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, ch, E, L, K, 1)
    Lf = tl.where(causal, tl.exp(tl.where(causal, cs[:, None] - cs[None, :], 0.0)), 0.0)  # decay j -> i, j <= i
    sf = _silu(xf)
    yf = tl.dot((CBf * Lf).to(dtype), (sf * dt[:, None]).to(dtype)) + Dh * sf
    if BIDIR:  # the backward scan, in place: j -> i for j >= i decays by a[i] + ... + a[j-1]
        xb = _conv(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, ch, E, L, K, -1)
        ce = cs - a
        Lb = tl.where(anti, tl.exp(tl.where(anti, ce[None, :] - ce[:, None], 0.0)), 0.0)
        sb = _silu(xb)
        yb = tl.dot((CBb * Lb).to(dtype), (sb * dt[:, None]).to(dtype)) + Dh * sb
    else:
        xb, Lb, yb = xf, Lf, tl.zeros_like(yf)
    z = tl.load(P + rows[:, None] * stride_p + ch[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    return dt_raw, dt, a, xf, xb, Lf, Lb, yf, yb, z


@triton.jit
def _setup(TABLE, n_seq, L: tl.constexpr, BLOCK: tl.constexpr, S, T_s):
    """The block of sequences of this program: step index vectors and the (BLOCK, BLOCK) masks."""
    i = tl.arange(0, BLOCK)
    seg = i // L
    seq = tl.program_id(0) * (BLOCK // L) + seg
    step = i - seg * L
    ok = (seg < BLOCK // L) & (seq < n_seq)
    rows, ok = _rows(TABLE, seq, step, ok, S, T_s, L)
    same = (seg[:, None] == seg[None, :]) & ok[:, None] & ok[None, :]
    causal = same & (i[None, :] <= i[:, None])  # [i, j]: j is i or before it in i's sequence
    anti = same & (i[None, :] >= i[:, None])
    return i, seq, step, ok, rows, causal, anti


@triton.jit
def _bc(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, E: tl.constexpr, N: tl.constexpr,
        L: tl.constexpr, K: tl.constexpr, SIGN: tl.constexpr):
    """B and C of one direction, before SiLU: (BLOCK, N) each."""
    cn = tl.arange(0, N)
    Bp = _conv(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, E + cn, E, L, K, SIGN)
    Cp = _conv(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, E + N + cn, E, L, K, SIGN)
    return Bp, Cp


@triton.jit
def _fwd_kernel(P, OUT, TABLE, CONV_W, CONV_B, DT_BIAS, A_LOG, DSKIP, NORM_W, n_seq, S, T_s, stride_p, stride_o,
                eps, E: tl.constexpr, NH: tl.constexpr, HD: tl.constexpr, N: tl.constexpr, L: tl.constexpr,
                K: tl.constexpr, BLOCK: tl.constexpr, BIDIR: tl.constexpr):
    i, seq, step, ok, rows, causal, anti = _setup(TABLE, n_seq, L, BLOCK, S, T_s)
    dtype = P.dtype.element_ty
    Bp, Cp = _bc(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, E, N, L, K, 1)
    CBf = tl.where(causal, tl.dot(_silu(Cp).to(dtype), tl.trans(_silu(Bp).to(dtype))), 0.0)  # C_i . B_j
    CBb = CBf
    if BIDIR:
        Bp, Cp = _bc(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, E, N, L, K, -1)
        CBb = tl.where(anti, tl.dot(_silu(Cp).to(dtype), tl.trans(_silu(Bp).to(dtype))), 0.0)

    # RMSNorm spans all heads: a first pass sums the squares, the second recomputes each head and writes it.
    ssf = tl.zeros([BLOCK], dtype=tl.float32)
    ssb = tl.zeros([BLOCK], dtype=tl.float32)
    for h in range(NH):
        _, _, _, _, _, _, _, yf, yb, z = _head(P, stride_p, TABLE, seq, step, ok, rows, S, T_s, CONV_W, CONV_B,
                                               DT_BIAS, A_LOG, DSKIP, h, CBf, CBb, causal, anti, E, NH, HD, N, L, K,
                                               BIDIR)
        gate = _silu(z)
        ssf += tl.sum(yf * gate * yf * gate, 1)
        ssb += tl.sum(yb * gate * yb * gate, 1)
    rf = tl.rsqrt(ssf / E + eps)
    rb = tl.rsqrt(ssb / E + eps)
    for h in range(NH):
        _, _, _, _, _, _, _, yf, yb, z = _head(P, stride_p, TABLE, seq, step, ok, rows, S, T_s, CONV_W, CONV_B,
                                               DT_BIAS, A_LOG, DSKIP, h, CBf, CBb, causal, anti, E, NH, HD, N, L, K,
                                               BIDIR)
        ch = h * HD + tl.arange(0, HD)
        gate = _silu(z)
        y = yf * gate * rf[:, None]
        if BIDIR:
            y += yb * gate * rb[:, None]
        y = y * tl.load(NORM_W + ch).to(tl.float32)[None, :]
        tl.store(OUT + rows[:, None] * stride_o + ch[None, :], y.to(OUT.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _conv_backward(P, DP, SCRATCH, stride_p, TABLE, seq, step, ok, rows, S, T_s, CONV_W, chan, dpf, dpb,
                   i, E: tl.constexpr, C: tl.constexpr, L: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
                   BIDIR: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Gradients of the convolution for channels `chan` of xBC, given the gradients of its outputs before SiLU in
    both directions (dpf, dpb: (BLOCK, len(chan))). Writes the input's gradient to DP; returns the partial
    gradients of the weight (len(chan), K) as K vectors summed in a (K, len(chan)) tensor, and of the bias."""
    # dx[j] = sum_k w_k dpf[j + K-1-k] (+ dpb[j - (K-1-k)]): other steps' gradients, so through a scratch buffer.
    base = SCRATCH + tl.program_id(0).to(tl.int64) * (2 * BLOCK * C)
    tl.store(base + i[:, None] * C + chan[None, :], dpf)
    if BIDIR:
        tl.store(base + BLOCK * C + i[:, None] * C + chan[None, :], dpb)
    tl.debug_barrier()  # the other threads' stores are visible after this
    dx = tl.zeros_like(dpf)
    kk = tl.arange(0, K)
    dw = tl.zeros([K, dpf.shape[1]], dtype=tl.float32)
    for k in tl.static_range(K):
        s = K - 1 - k
        m = ok & (step + s < L)
        g = tl.load(base + (i + s)[:, None] * C + chan[None, :], mask=m[:, None], other=0.0)
        r, mr = _rows(TABLE, seq, step - s, ok, S, T_s, L)  # the input tap k sees in the forward direction
        xin = tl.load(P + r[:, None] * stride_p + E + chan[None, :], mask=mr[:, None], other=0.0).to(tl.float32)
        dwk = tl.sum(dpf * xin, 0)
        if BIDIR:
            m = ok & (step - s >= 0)
            g += tl.load(base + BLOCK * C + (i - s)[:, None] * C + chan[None, :], mask=m[:, None], other=0.0)
            r, mr = _rows(TABLE, seq, step + s, ok, S, T_s, L)
            xin = tl.load(P + r[:, None] * stride_p + E + chan[None, :], mask=mr[:, None], other=0.0).to(tl.float32)
            dwk += tl.sum(dpb * xin, 0)
        dx += g * tl.load(CONV_W + chan * K + k).to(tl.float32)[None, :]
        dw += tl.where(kk[:, None] == k, dwk[None, :], 0.0)
    ptr = DP + rows[:, None] * stride_p + E + chan[None, :]
    if ACCUMULATE:
        dx += tl.load(ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(ptr, dx.to(DP.dtype.element_ty), mask=ok[:, None])
    return dw, tl.sum(dpf + dpb, 0)


@triton.jit
def _bwd_kernel(P, DOUT, DP, Y, SCRATCH, DPARAM, TABLE, CONV_W, CONV_B, DT_BIAS, A_LOG, DSKIP, NORM_W, n_seq, S,
                T_s, stride_p, stride_o, stride_param, eps, E: tl.constexpr, NH: tl.constexpr, HD: tl.constexpr,
                N: tl.constexpr, L: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, BIDIR: tl.constexpr,
                ACCUMULATE: tl.constexpr):
    """Gradients of one block of sequences. Writes d(projection) to DP (added to what is there if ACCUMULATE),
    the recomputed output to Y (for out_proj's weight gradient), and this program's share of the parameter
    gradients to its row of DPARAM: A_log, D, dt_bias (nh each), norm weight (E), conv bias (C), conv weight (C*K)."""
    C: tl.constexpr = E + 2 * N
    i, seq, step, ok, rows, causal, anti = _setup(TABLE, n_seq, L, BLOCK, S, T_s)
    dtype = P.dtype.element_ty
    Bp, Cp = _bc(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, E, N, L, K, 1)
    CBf = tl.where(causal, tl.dot(_silu(Cp).to(dtype), tl.trans(_silu(Bp).to(dtype))), 0.0)
    CBb = CBf
    if BIDIR:
        Bp, Cp = _bc(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, E, N, L, K, -1)
        CBb = tl.where(anti, tl.dot(_silu(Cp).to(dtype), tl.trans(_silu(Bp).to(dtype))), 0.0)

    # Pass 1: the norm's statistics over all heads: sum of squares, and sum of dout * w * g.
    ssf = tl.zeros([BLOCK], dtype=tl.float32)
    ssb = tl.zeros([BLOCK], dtype=tl.float32)
    ddf = tl.zeros([BLOCK], dtype=tl.float32)
    ddb = tl.zeros([BLOCK], dtype=tl.float32)
    for h in range(NH):
        _, _, _, _, _, _, _, yf, yb, z = _head(P, stride_p, TABLE, seq, step, ok, rows, S, T_s, CONV_W, CONV_B,
                                               DT_BIAS, A_LOG, DSKIP, h, CBf, CBb, causal, anti, E, NH, HD, N, L, K,
                                               BIDIR)
        ch = h * HD + tl.arange(0, HD)
        gate = _silu(z)
        dn = tl.load(DOUT + rows[:, None] * stride_o + ch[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        dn = dn * tl.load(NORM_W + ch).to(tl.float32)[None, :]
        ssf += tl.sum(yf * gate * yf * gate, 1)
        ssb += tl.sum(yb * gate * yb * gate, 1)
        ddf += tl.sum(dn * yf * gate, 1)
        ddb += tl.sum(dn * yb * gate, 1)
    rf = tl.rsqrt(ssf / E + eps)
    rb = tl.rsqrt(ssb / E + eps)
    cf = rf * rf * rf * ddf / E  # RMSNorm backward: dg = r dn - r^3 g (dn . g) / E
    cb = rb * rb * rb * ddb / E

    # Pass 2: each head's gradients; the B and C parts of the products accumulate over heads.
    dCBf = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    dCBb = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    prow = DPARAM + tl.program_id(0).to(tl.int64) * stride_param
    for h in range(NH):
        dt_raw, dt, a, xf, xb, Lf, Lb, yf, yb, z = _head(P, stride_p, TABLE, seq, step, ok, rows, S, T_s, CONV_W,
                                                         CONV_B, DT_BIAS, A_LOG, DSKIP, h, CBf, CBb, causal, anti, E,
                                                         NH, HD, N, L, K, BIDIR)
        ch = h * HD + tl.arange(0, HD)
        Dh = tl.load(DSKIP + h).to(tl.float32)
        A = -tl.exp(tl.load(A_LOG + h).to(tl.float32))
        w = tl.load(NORM_W + ch).to(tl.float32)[None, :]
        gate = _silu(z)
        dout = tl.load(DOUT + rows[:, None] * stride_o + ch[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        dn = dout * w
        normed = yf * gate * rf[:, None]
        if BIDIR:
            normed += yb * gate * rb[:, None]
        tl.store(Y + rows[:, None] * stride_o + ch[None, :], (normed * w).to(Y.dtype.element_ty), mask=ok[:, None])
        tl.store(prow + 3 * NH + ch, tl.sum(dout * normed, 0))  # norm weight

        dgf = rf[:, None] * dn - cf[:, None] * yf * gate
        dgb = rb[:, None] * dn - cb[:, None] * yb * gate
        dz = dgf * yf * _dsilu(z)
        if BIDIR:
            dz += dgb * yb * _dsilu(z)
        ptr = DP + rows[:, None] * stride_p + ch[None, :]
        if ACCUMULATE:
            dz += tl.load(ptr, mask=ok[:, None], other=0.0).to(tl.float32)
        tl.store(ptr, dz.to(DP.dtype.element_ty), mask=ok[:, None])

        # The scan of one direction: y = S u + D s, S = CB * decay, u = dt s, s = silu(conv x).
        dyf = dgf * gate
        sf = _silu(xf)
        uf = (sf * dt[:, None]).to(dtype)
        dSf = tl.where(causal, tl.dot(dyf.to(dtype), tl.trans(uf)), 0.0)
        duf = tl.dot(tl.trans((CBf * Lf).to(dtype)), dyf.to(dtype))
        dsf = duf * dt[:, None] + Dh * dyf
        dD = tl.sum(tl.sum(dyf * sf, 1), 0)
        ddt = tl.sum(duf * sf, 1)
        dCBf += dSf * Lf
        t = dSf * CBf * Lf
        dcs = tl.sum(t, 1) - tl.sum(t, 0)  # d(cs_i - cs_j)
        da = tl.zeros_like(dcs)
        dpf = dsf * _dsilu(xf)
        dpb = tl.zeros_like(dpf)
        if BIDIR:
            dyb = dgb * gate
            sb = _silu(xb)
            ub = (sb * dt[:, None]).to(dtype)
            dSb = tl.where(anti, tl.dot(dyb.to(dtype), tl.trans(ub)), 0.0)
            dub = tl.dot(tl.trans((CBb * Lb).to(dtype)), dyb.to(dtype))
            dsb = dub * dt[:, None] + Dh * dyb
            dD += tl.sum(tl.sum(dyb * sb, 1), 0)
            ddt += tl.sum(dub * sb, 1)
            dCBb += dSb * Lb
            t = dSb * CBb * Lb
            dce = tl.sum(t, 0) - tl.sum(t, 1)  # exponent ce_j - ce_i, ce = cs - a
            dcs += dce
            da -= dce
            dpb = dsb * _dsilu(xb)
        # cs is a cumulative sum within each sequence: its gradient is the reversed cumulative sum of dcs.
        da += tl.sum(tl.where(anti, dcs[None, :], 0.0), 1)
        ddt += da * A
        x = dt_raw + tl.load(DT_BIAS + h).to(tl.float32)
        ddt_raw = tl.where(ok, ddt * tl.where(x > 20.0, 1.0, tl.sigmoid(x)), 0.0)  # softplus' = sigmoid
        tl.store(prow + h, tl.sum(da * dt, 0) * A)  # A = -exp(A_log): dA_log = dA * A
        tl.store(prow + NH + h, dD)
        tl.store(prow + 2 * NH + h, tl.sum(ddt_raw, 0))
        ptr = DP + rows * stride_p + 2 * E + 2 * N + h
        if ACCUMULATE:
            ddt_raw += tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        tl.store(ptr, ddt_raw.to(DP.dtype.element_ty), mask=ok)
        dw, db = _conv_backward(P, DP, SCRATCH, stride_p, TABLE, seq, step, ok, rows, S, T_s, CONV_W, ch, dpf,
                                dpb, i, E, C, L, K, BLOCK, BIDIR, ACCUMULATE)
        tl.store(prow + 3 * NH + E + ch, db)
        tl.store(prow + 3 * NH + E + C + ch[None, :] * K + tl.arange(0, K)[:, None], dw)

    # B and C: C_i . B_j feeds every head's scores. Recomputed here rather than kept through the loop over heads.
    cn = E + tl.arange(0, N)
    Bpf, Cpf = _bc(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, E, N, L, K, 1)
    dBf = tl.dot(tl.trans(dCBf).to(dtype), _silu(Cpf).to(dtype))
    dCf = tl.dot(dCBf.to(dtype), _silu(Bpf).to(dtype))
    Bpb, Cpb, dBb, dCb = Bpf, Cpf, tl.zeros_like(dBf), tl.zeros_like(dCf)
    if BIDIR:
        Bpb, Cpb = _bc(P, stride_p, TABLE, seq, step, ok, S, T_s, CONV_W, CONV_B, E, N, L, K, -1)
        dBb = tl.dot(tl.trans(dCBb).to(dtype), _silu(Cpb).to(dtype))
        dCb = tl.dot(dCBb.to(dtype), _silu(Bpb).to(dtype))
    dw, db = _conv_backward(P, DP, SCRATCH, stride_p, TABLE, seq, step, ok, rows, S, T_s, CONV_W, cn,
                            dBf * _dsilu(Bpf), dBb * _dsilu(Bpb), i, E, C, L, K, BLOCK, BIDIR, ACCUMULATE)
    tl.store(prow + 3 * NH + E + cn, db)
    tl.store(prow + 3 * NH + E + C + cn[None, :] * K + tl.arange(0, K)[:, None], dw)
    dw, db = _conv_backward(P, DP, SCRATCH, stride_p, TABLE, seq, step, ok, rows, S, T_s, CONV_W, cn + N,
                            dCf * _dsilu(Cpf), dCb * _dsilu(Cpb), i, E, C, L, K, BLOCK, BIDIR, ACCUMULATE)
    tl.store(prow + 3 * NH + E + cn + N, db)
    tl.store(prow + 3 * NH + E + C + (cn + N)[None, :] * K + tl.arange(0, K)[:, None], dw)


# ---------------------------------------------------------------------------------------------------------
# Launching, and the autograd op around in_proj -> mixer -> out_proj
# ---------------------------------------------------------------------------------------------------------

MIN_BLOCK = 16  # steps a program holds at least: short sequences are packed BLOCK // L to a program
WARPS = {16: 4, 32: 4, 64: 8, 128: 8}  # by BLOCK


def block_size(L):
    return max(MIN_BLOCK, triton.next_power_of_2(L))


def supported(E, nh, N, d_conv, ngroups, lengths):
    """Whether the kernels take this layer and these sequence lengths."""
    pow2 = lambda v: v >= 16 and v & (v - 1) == 0  # noqa: E731  (tl.arange and tl.dot need powers of two >= 16)
    return (ngroups == 1 and pow2(E // nh) and pow2(N) and d_conv & (d_conv - 1) == 0
            and all(1 <= L <= MAX_LEN for L in lengths))


def _meta(conv_w, dt_bias, norm_w):
    E, nh, C, K = norm_w.numel(), dt_bias.numel(), conv_w.shape[0], conv_w.shape[-1]
    return dict(E=E, NH=nh, HD=E // nh, N=(C - E) // 2, K=K)


def _launches(tables, tokens, T):
    """(table, n_seq, L, BLOCK, programs) for each table; each sample of T // tokens holds every table's sequences."""
    for table in tables:
        S, L = table.shape
        n_seq = (T // tokens) * S
        block = block_size(L)
        yield table, n_seq, L, block, triton.cdiv(n_seq, block // L)


def _forward(u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps, bidirectional):
    meta = _meta(conv_w, dt_bias, norm_w)
    p = u @ in_w.t()  # (T, P): z, xBC, dt of every token
    outs = []
    for k in range(max(planes) + 1):
        y = torch.empty(p.shape[0], meta["E"], dtype=p.dtype, device=p.device)
        for table, n_seq, L, block, programs in _launches([t for t, q in zip(tables, planes) if q == k], tokens,
                                                          p.shape[0]):
            _fwd_kernel[(programs,)](p, y, table, conv_w, conv_b, dt_bias, A_log, D, norm_w, n_seq, table.shape[0],
                                     tokens, p.stride(0), y.stride(0), eps, L=L, BLOCK=block, BIDIR=bidirectional,
                                     num_warps=WARPS[block], **meta)
        outs.append(y @ out_w.t())
    return torch.stack(outs)


def _backward(grad, u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps,
              bidirectional):
    meta = _meta(conv_w, dt_bias, norm_w)
    E, nh, C, K = meta["E"], meta["NH"], conv_w.shape[0], meta["K"]
    p = u @ in_w.t()  # recomputed: the forward pass kept only u
    dp = torch.empty_like(p)
    d_out_w = torch.zeros_like(out_w, dtype=torch.float32)
    dparam = torch.zeros(3 * nh + E + C + C * K, dtype=torch.float32, device=u.device)
    for k in range(max(planes) + 1):
        dy = grad[k] @ out_w  # (T, E): the gradient of the mixer's output
        y = torch.empty_like(dy)
        for table, n_seq, L, block, programs in _launches([t for t, q in zip(tables, planes) if q == k], tokens,
                                                          p.shape[0]):
            scratch = torch.empty(programs, 2, block, C, dtype=torch.float32, device=u.device)
            part = torch.empty(programs, dparam.numel(), dtype=torch.float32, device=u.device)
            _bwd_kernel[(programs,)](p, dy, dp, y, scratch, part, table, conv_w, conv_b, dt_bias, A_log, D, norm_w,
                                     n_seq, table.shape[0], tokens, p.stride(0), dy.stride(0), part.stride(0), eps,
                                     L=L, BLOCK=block, BIDIR=bidirectional, ACCUMULATE=k > 0, num_warps=WARPS[block],
                                     **meta)
            dparam += part.sum(0)
        d_out_w += grad[k].t().float() @ y.float()
    dA_log, dD, ddt_bias, dnorm_w, dconv_b, dconv_w = dparam.split([nh, nh, nh, E, C, C * K])
    small = [g.view_as(w).to(w.dtype, copy=True) for g, w in ((dconv_w, conv_w), (dconv_b, conv_b),
             (ddt_bias, dt_bias), (dA_log, A_log), (dD, D), (dnorm_w, norm_w))]  # own memory, not views of dparam
    return (dp @ in_w, dp.t() @ u, *small, d_out_w.to(out_w.dtype))


@torch.library.custom_op("medsora::mamba_planes", mutates_args=())
def mamba_planes(u: torch.Tensor, in_w: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor,
                 dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor, norm_w: torch.Tensor,
                 out_w: torch.Tensor, tables: list[torch.Tensor], planes: list[int], tokens: int, eps: float,
                 bidirectional: bool) -> torch.Tensor:
    """u (T, D) -> (n_planes, T, D): out_proj(mixer(in_proj(u))) for each plane, a plane being the tables whose
    `planes` entry is its index. `tokens`: tokens per sample; tables (S, L) int32 hold positions within a sample,
    and the tables of one plane hold every token of a sample exactly once."""
    with torch.autocast(u.device.type, enabled=False):
        return _forward(u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps,
                        bidirectional)


@mamba_planes.register_fake
def _(u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps, bidirectional):
    return u.new_empty(max(planes) + 1, u.shape[0], out_w.shape[0])


@torch.library.custom_op("medsora::mamba_planes_backward", mutates_args=())
def mamba_planes_backward(grad: torch.Tensor, u: torch.Tensor, in_w: torch.Tensor, conv_w: torch.Tensor,
                          conv_b: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
                          norm_w: torch.Tensor, out_w: torch.Tensor, tables: list[torch.Tensor], planes: list[int],
                          tokens: int, eps: float, bidirectional: bool) -> list[torch.Tensor]:
    with torch.autocast(u.device.type, enabled=False):
        return list(_backward(grad, u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes,
                              tokens, eps, bidirectional))


@mamba_planes_backward.register_fake
def _(grad, u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps, bidirectional):
    return [torch.empty_like(t) for t in (u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w)]


def _setup_context(ctx, inputs, output):
    u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, tables, planes, tokens, eps, bidirectional = inputs
    ctx.save_for_backward(u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, *tables)
    ctx.args = (planes, tokens, eps, bidirectional)


def _autograd_backward(ctx, grad):
    u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, *tables = ctx.saved_tensors
    grads = mamba_planes_backward(grad.contiguous(), u, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w,
                                  tables, *ctx.args)
    return (*grads, [None] * len(tables), None, None, None, None)


mamba_planes.register_autograd(_autograd_backward, setup_context=_setup_context)
