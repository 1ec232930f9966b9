"""
Mamba-2 (SSD) layer and the scan orders MedSora runs it in.

Paper (MedSora, arXiv 2411.01647): Sec. 2.2 (Eq. 3-4, the scalar state-space model), Sec. 3.1 (Eq. 8, spiral
scans; Eq. 10, temporal scan), Table 1 (the layer's hyper-parameters, used here as defaults).

The selective SSM of Mamba-2 maps a sequence x (L, P) to y (L, P) through a hidden state h (P, N):

    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T,     y_t = h_t C_t + D x_t            (Eq. 3)

where A is one negative scalar per head (that is what makes it "scalar" / SSD), dt_t > 0 is a per-step,
per-head step size, and B_t, C_t are N-vectors computed from the input. The same map is a lower-triangular
(semiseparable) matrix multiplication y = M x (Eq. 4), which the chunked algorithm exploits.

Three implementations of the scan, all computing the same function:
    "recurrent"  the literal recurrence of Eq. 3, one step at a time (the reference; slow).
    "chunked"    the SSD chunked algorithm in pure PyTorch: quadratic attention-like products inside chunks,
                 the recurrence only between chunk states. Any length, CPU or GPU, torch.compile-friendly.
    "kernel"     mamba-ssm's Triton kernels (CUDA only); fused with causal-conv1d's CUDA conv when present.
"auto" picks "kernel" on CUDA when mamba-ssm imports and the sequence spans several chunks, else "chunked".

The layer `Mamba2` has the same parameter names and shapes as `mamba_ssm.Mamba2`, so one state dict loads
in both. Its `forward` takes a list of scan orders (index permutations of the sequence): the input is
projected once, scanned in each order, put back in place and summed. Bidirectional = (identity, reverse);
MedSora's spatial scan = (spiral, reverse spiral) over a (rows x cols) grid. `forward_planes` takes scan
tables instead (rows of token positions in scan order, each scanned both ways; dit.py builds them), which is
how MedSora calls it: on a GPU ("auto" or "fused") one op, ssd_triton.py, then does the whole layer for
sequences of up to 128 steps, the readable path (scan_tables, with the scans above) being its reference.

Dimension names: B batch, L sequence length, D model width, E inner width (expand * D), nh heads,
hd head dim, N state size, G groups.

Run `python ssm.py` to compare the three scans on random input.
"""

import math
import os
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# The GPU packages are optional: importing this file must work on a CPU machine without them.
try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as triton_gated_rmsnorm
except Exception:  # ImportError, or a broken CUDA extension
    mamba_chunk_scan_combined = mamba_split_conv1d_scan_combined = triton_gated_rmsnorm = None
try:
    from causal_conv1d import causal_conv1d_fn
    import causal_conv1d_cuda  # noqa: F401  (the fused path needs the compiled extension, not only the wrapper)
except Exception:
    causal_conv1d_fn = None

try:  # the fused short-sequence mixer (Triton; on a CPU only under its interpreter, TRITON_INTERPRET=1)
    import ssd_triton
    MAX_FUSED_LEN = ssd_triton.MAX_LEN
except Exception:  # no Triton
    ssd_triton, MAX_FUSED_LEN = None, 0

SCANS = ("auto", "fused", "kernel", "chunked", "recurrent")


def ssd_triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels_available(device):
    return mamba_chunk_scan_combined is not None and torch.device(device).type == "cuda"


def pick_scan(scan, device, L, chunk_size):
    """Resolve scan="auto". Sequences that fit in one chunk need no chunk states, which the kernels still
    write for every sequence: on an H100 the chunked path was faster at all of MedSora's lengths (1-32 steps;
    see benchmark.py --layers). The kernels are for sequences that span several chunks."""
    if scan not in ("auto", "fused"):  # "fused" is a whole-layer path (forward_planes); single scans go by "auto"
        return scan
    return "kernel" if kernels_available(device) and L > chunk_size else "chunked"


def kernel_chunk(chunk_size, L):
    """The kernels pad every sequence to whole chunks: for short sequences (MedSora's temporal scans are 1-4
    steps) a 256-step chunk is mostly padding. The chunk size does not change the result, only the work."""
    return min(chunk_size, max(16, 1 << (L - 1).bit_length()))


# ---------------------------------------------------------------------------------------------------------
# The scan, three ways. All take the discretisation inputs after softplus:
#   x (B, L, nh, hd), dt (B, L, nh) > 0, A (nh,) < 0, B and C (B, L, G, N), D (nh,)  ->  y (B, L, nh, hd)
# ---------------------------------------------------------------------------------------------------------

def _heads_from_groups(M, nheads):
    """B and C are shared by the heads of a group: expand (..., G, N) to (..., nh, N)."""
    return M.repeat_interleave(nheads // M.shape[-2], dim=-2)


def ssd_recurrent(x, dt, A, B, C, D):
    """Eq. 3 literally: one state update per step. The reference every other path is tested against."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # the state is accumulated in at least fp32
    x, dt, A, D = x.to(dtype), dt.to(dtype), A.to(dtype), D.to(dtype)
    B, C = _heads_from_groups(B, x.shape[2]).to(dtype), _heads_from_groups(C, x.shape[2]).to(dtype)
    b, L, nh, hd = x.shape
    h = x.new_zeros(b, nh, hd, B.shape[-1])  # (B, nh, hd, N)
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)  # (B, nh): the scalar A of SSD, discretised with step dt
        h = decay[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) + D[:, None] * x  # D is a skip connection per head
    return y


def segment_sums(a):
    """(..., Q) -> (..., Q, Q) with [i, j] = a[j+1] + ... + a[i] for i >= j and -inf above the diagonal.

    exp() of it is the decay from step j to step i, the lower-triangular factor of M in Eq. 4. Summing the
    masked entries directly (instead of subtracting two cumulative sums) avoids cancellation on long chunks.
    """
    Q = a.shape[-1]
    below = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)
    s = a[..., :, None].expand(*a.shape, Q).masked_fill(~below, 0).cumsum(dim=-2)  # [i, j] = sum_{j<k<=i} a_k
    return s.masked_fill(~torch.ones_like(below).tril(0), -math.inf)


def _decays(a):
    """(..., Q) log-decays -> a_1 + ... + a_i (..., Q) and the decays from step j to step i (..., Q, Q).

    The sums are read off the segment sums, whose (..., Q, Q) block is freed on return: a.cumsum(-1) broke
    Inductor's Triton code generation for chunks of 256 under torch.compile (torch 2.11: "list indices must be
    integers or slices, not NoneType").
    """
    seg = segment_sums(a)
    return seg[..., :, 0] + a[..., :1], torch.exp(seg)


def ssd_chunked(x, dt, A, B, C, D, chunk_size=256):
    """The SSD algorithm: split the sequence into chunks of Q steps.

    Inside a chunk, y = (C B^T * decay) (dt x): a masked attention-like product (Eq. 4 restricted to the
    diagonal blocks). Across chunks, each chunk's final state is passed on by the plain recurrence, and
    every step reads the state it inherited through C. Works for any L: the tail is zero-padded, which
    cannot change earlier outputs because the scan is causal.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    if x.shape[1] == 1:  # one step from a zero state: h = dt x B^T, so y = dt (C . B) x + D x, pointwise
        CB = _heads_from_groups((C.to(dtype) * B.to(dtype)).sum(-1, keepdim=True), x.shape[2])  # (B, 1, nh, 1)
        return (dt.to(dtype)[..., None] * CB + D.to(dtype)[:, None]) * x.to(dtype)
    x_in = x
    b, L, nh, hd = x.shape
    G = B.shape[2]
    Q = min(chunk_size, L)
    pad = (-L) % Q
    x, dt = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad)), F.pad(dt.to(dtype), (0, 0, 0, pad))
    B, C = F.pad(B.to(dtype), (0, 0, 0, 0, 0, pad)), F.pad(C.to(dtype), (0, 0, 0, 0, 0, pad))
    x, dt, B, C = (rearrange(t, "b (c q) ... -> b c q ...", q=Q) for t in (x, dt, B, C))
    a = rearrange(dt * A.to(dtype), "b c q h -> b h c q")  # log-decay per step (<= 0)
    a_cum, decay = _decays(a)  # (B, nh, c, Q), (B, nh, c, Q, Q)
    xdt = x * dt[..., None]  # the input term dt_t x_t of Eq. 3

    # 1. Within each chunk: the diagonal blocks of M, as masked "attention" scores C_i . B_j * decay(j -> i).
    # C_i . B_j is computed once per group and shared by the group's heads (no copy of B, C per head).
    CB = torch.einsum("bcign,bcjgn->bgcij", C, B)  # (B, G, c, Q, Q)
    decay = rearrange(decay, "b (g k) c i j -> b g k c i j", g=G)
    scores = rearrange(CB[:, :, None] * decay, "b g k c i j -> b (g k) c i j")  # (B, nh, c, Q, Q)
    y = torch.einsum("bhcij,bcjhp->bcihp", scores, xdt)
    if x.shape[1] > 1:  # several chunks: add what each step inherits from earlier chunks
        y = y + _inherited(a_cum, _heads_from_groups(B, nh), _heads_from_groups(C, nh), xdt)
    y = rearrange(y, "b c q h p -> b (c q) h p")[:, :L]
    return y + D.to(dtype)[:, None] * x_in.to(dtype)


def _inherited(a_cum, B, C, xdt):
    """The off-diagonal blocks of M: chunk states passed on by the recurrence, read through C.

    Skipped for sequences that fit in one chunk (MedSora's are 4-48 steps): the states are (nh, hd, N) per
    sequence and chunk, far larger than such short inputs, and zero there anyway.
    """
    # 2. The state each chunk ends with, starting from zero at the chunk's start.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (B, nh, c, Q)
    states = torch.einsum("bcjhn,bhcj,bcjhp->bchpn", B, decay_to_end, xdt)

    # 3. Between chunks: the recurrence over chunk states (c steps, with the chunks' total decays).
    chunk_decay = torch.exp(segment_sums(F.pad(a_cum[..., -1], (1, 0))))  # (B, nh, c+1, c+1)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # zero initial state
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]  # state entering each chunk

    # 4. What each step reads from the state it inherited.
    return torch.einsum("bcihn,bchpn,bhci->bcihp", C, states, torch.exp(a_cum))


def ssd_scan(x, dt, A, B, C, D, chunk_size=256, scan="auto"):
    """Run the scan with one implementation. dt is the step size after softplus (positive)."""
    scan = pick_scan(scan, x.device, x.shape[1], chunk_size)
    if scan == "kernel":
        if not kernels_available(x.device):
            raise RuntimeError("scan='kernel' needs mamba-ssm's Triton kernels and a CUDA tensor; "
                               "install mamba-ssm on a GPU machine or use scan='chunked'")
        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D)
    if scan == "chunked":
        return ssd_chunked(x, dt, A, B, C, D, chunk_size).to(x.dtype)
    if scan == "recurrent":
        return ssd_recurrent(x, dt, A, B, C, D).to(x.dtype)
    raise ValueError(f"unknown scan {scan!r}; expected one of {SCANS}")


def causal_depthwise_conv(x, weight, bias):
    """x (B, L, C), weight (C, 1, K) as nn.Conv1d stores it: y_t = bias + sum_k weight_k * x_{t-K+1+k}.

    K shifted multiply-adds; faster than a grouped nn.Conv1d call (CPU and cuDNN) for K = 4, same result.
    """
    K, L = weight.shape[-1], x.shape[1]
    if L == 1:  # only the last tap sees a step; the others see the zero padding
        return x * weight[:, 0, -1] + bias
    xp = F.pad(x, (0, 0, K - 1, 0))  # zeros before the first step: the convolution is causal
    return sum(xp[:, k:k + L] * weight[:, 0, k] for k in range(K)) + bias


def gated_rmsnorm(y, z, weight, eps=1e-5, groups=1):
    """RMSNorm(y * silu(z)) * weight over groups of channels (mamba's RMSNormGated, norm_before_gate=False)."""
    dtype = y.dtype
    y = y.float() * F.silu(z.float())
    y = rearrange(y, "... (g c) -> ... g c", g=groups)
    y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (rearrange(y, "... g c -> ... (g c)") * weight.float()).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------

class GatedRMSNorm(nn.Module):
    """Holds the weight under the name mamba_ssm uses (`norm.weight`)."""

    def __init__(self, dim, eps=1e-5, groups=1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.groups = eps, groups

    def forward(self, y, z, use_triton=False):
        if use_triton and triton_gated_rmsnorm is not None and y.is_cuda:
            return triton_gated_rmsnorm(y, self.weight, None, z=z, eps=self.eps,
                                        group_size=y.shape[-1] // self.groups, norm_before_gate=False)
        return gated_rmsnorm(y, z, self.weight, self.eps, self.groups)


class Mamba2(nn.Module):
    """A Mamba-2 layer whose state dict matches mamba_ssm.Mamba2 (rmsnorm=True, bias=False, conv_bias=True)."""

    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, A_init_range=(1, 16),
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, chunk_size=256, scan="auto"):
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"unknown scan {scan!r}; expected one of {SCANS}")
        self.d_model, self.d_state, self.d_conv, self.headdim, self.ngroups = d_model, d_state, d_conv, headdim, ngroups
        self.d_inner = expand * d_model  # E
        if self.d_inner % headdim:
            raise ValueError(f"expand * d_model = {self.d_inner} is not a multiple of headdim = {headdim}")
        self.nheads = self.d_inner // headdim
        self.chunk_size, self.scan = chunk_size, scan

        # One projection gives the gate z (E), the conv input xBC (E + 2GN) and dt (nh), in mamba's order.
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_dim + self.nheads, bias=False)
        # Depthwise causal convolution over the sequence: the "local convolution width" of Table 1.
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True)

        # dt is initialised log-uniformly in [dt_min, dt_max]; dt_bias stores softplus^-1 of it.
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_log), one scalar per head, initialised uniformly in A_init_range.
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, eps=1e-5, groups=ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def mix(self, zxbcdt):
        """The sequence mixer on projected input (B, L, 2E + 2GN + nh) in scan order -> (B, L, E), before out_proj."""
        scan = pick_scan(self.scan, zxbcdt.device, zxbcdt.shape[1], self.chunk_size)
        A = -torch.exp(self.A_log.float())  # (nh,), kept in fp32 as mamba does
        if scan == "kernel" and causal_conv1d_fn is not None:
            # Fused conv + scan + gated norm (mamba's "mem-eff" path), without the output projection.
            return mamba_split_conv1d_scan_combined(
                zxbcdt, rearrange(self.conv1d.weight, "d 1 w -> d w"), self.conv1d.bias, self.dt_bias, A, self.D,
                chunk_size=kernel_chunk(self.chunk_size, zxbcdt.shape[1]), activation="silu",
                rmsnorm_weight=self.norm.weight,
                rmsnorm_eps=self.norm.eps, outproj_weight=None, headdim=self.headdim, ngroups=self.ngroups,
                norm_before_gate=False)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv1d.in_channels, self.nheads], dim=-1)
        L = xBC.shape[1]
        xBC = F.silu(causal_depthwise_conv(xBC, self.conv1d.weight, self.conv1d.bias))
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = rearrange(x, "b l (h p) -> b l h p", p=self.headdim)
        B = rearrange(B, "b l (g n) -> b l g n", g=self.ngroups)
        C = rearrange(C, "b l (g n) -> b l g n", g=self.ngroups)
        if scan == "kernel":  # the kernel applies dt_bias and softplus itself, in fp32
            y = mamba_chunk_scan_combined(x, dt, A, B, C, kernel_chunk(self.chunk_size, L), D=self.D,
                                          dt_bias=self.dt_bias, dt_softplus=True)
        else:
            dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, L, nh), positive step sizes
            y = ssd_scan(x, dt, A, B, C, self.D, self.chunk_size, scan)
        y = rearrange(y, "b l h p -> b l (h p)")
        return self.norm(y, z, use_triton=(scan == "kernel"))

    def forward(self, u, orders=None):
        """u (B, L, D) -> (B, L, D). `orders`: scan orders (LongTensors of length L); outputs are summed."""
        zxbcdt = self.in_proj(u)  # projected once, whatever the number of scans
        return self.out_proj(self.scan_orders(zxbcdt, orders))

    def scan_tables(self, zxbcdt, tables, bidirectional=True):
        """Scan projected tokens (B, T, *) along the sequences of `tables` -> (B, T, E).

        Each table is (S, L): S sequences of L token positions (in 0 .. T-1) in scan order; together the tables hold
        every token exactly once. Each sequence is scanned forward and, if bidirectional, backward (the reverse
        order), and the outputs are summed in place: a spiral and its reverse (Eq. 8), or a token's frames both
        ways (Eq. 10). This is what ssd_triton.py fuses into one kernel.
        """
        b, T = zxbcdt.shape[:2]
        out = None
        for table in tables:
            seqs = rearrange(zxbcdt[:, table], "b s l p -> (b s) l p")  # gathered in scan order
            if bidirectional:  # both directions in one batch: one scan call; the reverse put back in forward order
                y = self.mix(torch.cat([seqs, seqs.flip(1)]))
                y = y[:len(seqs)] + y[len(seqs):].flip(1)
            else:
                y = self.mix(seqs)
            if out is None:
                out = y.new_zeros(b, T, y.shape[-1])
            out[:, table.flatten()] = rearrange(y, "(b s) l e -> b (s l) e", b=b)  # back in place
        return out

    def forward_planes(self, u, planes, bidirectional=True):
        """u (B, T, D) -> one (B, T, D) output per plane: out_proj(scan_tables(in_proj(u), tables)) for each list of
        tables in `planes`; the input is projected once for all of them. On the fused path (scan "fused", or "auto"
        on a GPU with Triton) one op computes it all and keeps only u for the backward pass."""
        lengths = [t.shape[1] for tables in planes for t in tables]
        if self.use_fused(u.device, lengths):
            return self.fused_planes(u, planes, bidirectional)
        zxbcdt = self.in_proj(u)
        return [self.out_proj(self.scan_tables(zxbcdt, tables, bidirectional)) for tables in planes]

    def use_fused(self, device, lengths):
        if self.scan not in ("auto", "fused"):
            return False
        ok = (ssd_triton is not None  # on a CPU only when asked for: Triton's interpreter is for tests
              and (torch.device(device).type == "cuda" or (self.scan == "fused" and ssd_triton_interpreted()))
              and ssd_triton.supported(self.d_inner, self.nheads, self.d_state, self.d_conv, self.ngroups, lengths))
        if self.scan == "fused" and not ok:
            raise RuntimeError(f"scan='fused' needs Triton and a GPU (or TRITON_INTERPRET=1), ngroups 1, head dim and "
                               f"state size powers of two >= 16 and sequences of 1 to {MAX_FUSED_LEN} steps; got "
                               f"lengths {sorted(set(lengths))}: use scan='auto'")
        return ok

    def fused_planes(self, u, planes, bidirectional=True):
        b, T, D = u.shape
        dtype = torch.get_autocast_dtype(u.device.type) if torch.is_autocast_enabled(u.device.type) else u.dtype
        tables = [t for tables in planes for t in tables]
        index = [k for k, tables in enumerate(planes) for _ in tables]
        w = lambda p: p.to(dtype)  # noqa: E731  (the products run in the autocast dtype, as nn.Linear's would)
        out = ssd_triton.mamba_planes(
            w(u.reshape(b * T, D)), w(self.in_proj.weight), self.conv1d.weight, self.conv1d.bias, self.dt_bias,
            self.A_log, self.D, self.norm.weight, w(self.out_proj.weight), [t.int() for t in tables], index, T,
            self.norm.eps, bidirectional)[0]  # (the rest is what its backward pass keeps)
        return list(out.view(len(planes), b, T, D).unbind(0))

    def scan_orders(self, zxbcdt, orders=None):
        """Scan projected input (B, L, *) in each order, put each result back in place, sum: (B, L, E)."""
        if orders is None:
            return self.mix(zxbcdt)
        if zxbcdt.shape[1] == 1:  # one step (an image as a one-frame clip): every order is the identity
            return len(orders) * self.mix(zxbcdt)
        b = zxbcdt.shape[0]
        # All orders go through the mixer as one batch: one kernel launch instead of len(orders).
        y = self.mix(torch.cat([zxbcdt[:, o] for o in orders], dim=0))
        return sum(y[i * b:(i + 1) * b, inverse(o)] for i, o in enumerate(orders))


# ---------------------------------------------------------------------------------------------------------
# Scan orders: index permutations. order[k] = the position visited at step k; inverse(order)[p] = its step.
# Scanning x[:, order] and then indexing the result with inverse(order) puts every output back at its position.
# ---------------------------------------------------------------------------------------------------------

def inverse(order):
    inv = torch.empty_like(order)
    inv[order] = torch.arange(len(order), device=order.device)
    return inv


@lru_cache(maxsize=None)
def bidirectional(length, device=None):
    fwd = torch.arange(length, device=device)
    return fwd, fwd.flip(0)


# The first step (row step, col step) of a walk from each start corner: clockwise, then counter-clockwise.
_FIRST_STEP = {
    True: {"top-left": (0, 1), "top-right": (1, 0), "bottom-right": (0, -1), "bottom-left": (-1, 0)},
    False: {"top-left": (1, 0), "top-right": (0, -1), "bottom-right": (-1, 0), "bottom-left": (0, 1)},
}
SPIRALS = [(corner, cw) for cw in (True, False) for corner in _FIRST_STEP[cw]]  # the 8 variants blocks cycle through


@lru_cache(maxsize=None)
def _spiral_list(rows, cols, corner, clockwise):
    """Walk inward from a corner, turning (right if clockwise, else left) at the border or a visited cell."""
    r, c = (0 if corner.startswith("top") else rows - 1), (0 if corner.endswith("left") else cols - 1)
    dr, dc = _FIRST_STEP[clockwise][corner]
    seen, order = set(), []
    for _ in range(rows * cols):
        order.append(r * cols + c)
        seen.add((r, c))
        for _turn in range(2):  # at most one turn is needed; a second means the walk is complete
            nr, nc = r + dr, c + dc
            if 0 <= nr < rows and 0 <= nc < cols and (nr, nc) not in seen:
                break
            dr, dc = (dc, -dr) if clockwise else (-dc, dr)  # turn right / turn left (rows grow downwards)
        r, c = nr, nc
    return tuple(order)


@lru_cache(maxsize=None)
def spiral(rows, cols, variant=0, device=None):
    """Spiral order over a (rows x cols) grid flattened row-major, and its reverse: the Omega of Eq. 8.

    Every step moves to a 4-neighbour. `variant` picks the start corner and the sense (SPIRALS[variant % 8]).
    Cached per device, so the model does not copy it to the GPU at every block.
    """
    corner, clockwise = SPIRALS[variant % len(SPIRALS)]
    order = torch.tensor(_spiral_list(rows, cols, corner, clockwise), device=device)
    return order, order.flip(0)


if __name__ == "__main__":
    torch.manual_seed(0)
    b, L, nh, hd, N = 2, 300, 4, 16, 32
    x, B, C = torch.randn(b, L, nh, hd), torch.randn(b, L, 1, N), torch.randn(b, L, 1, N)
    dt, A, D = F.softplus(torch.randn(b, L, nh)), -torch.rand(nh) * 4, torch.randn(nh)
    ref = ssd_recurrent(x, dt, A, B, C, D)
    print(f"chunked vs recurrent, L={L}: max |diff| = {(ssd_chunked(x, dt, A, B, C, D, 64) - ref).abs().max():.2e}")
    print("clockwise spiral over a 4 x 5 grid:")
    step = inverse(spiral(4, 5)[0]).view(4, 5)
    print("\n".join(" ".join(f"{int(s):3d}" for s in row) for row in step))
