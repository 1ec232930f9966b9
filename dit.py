"""
The video Mamba diffusion model: MedSora's denoiser (paper Sec. 3.1, Fig. 2-3, Eq. 6-10, Table 1).

A DiT-style backbone over latent frames. Each frame is cut into 2x2 patches (tokens), and every block runs
    1. local attention inside each frame                                                   (Eq. 6-7)
    2. spatial Mamba over two planes of tokens, (b*h, f*w) and (b*w, f*h), each scanned along a spiral and
       the reverse spiral, put back in place and summed, the planes fused by a sigmoid gate   (Eq. 8-9)
    3. temporal Mamba along the frames of each token position                                (Eq. 10)
each as a residual branch conditioned on the diffusion step through adaLN-Zero (shift, scale, gate).
There is no MLP: Table 1's parameter counts have none. The model predicts the noise epsilon.

Joint image-video training (Sec. 3.4): the input holds f video frames followed by n independent images.
Step 1 and the norms act per frame; in steps 2 and 3 the video is one clip and each image is a clip of one
frame of its own: the scan tables (block_indices) give each image's rows, columns and tokens sequences of
their own, so no image ever mixes with another image or with the video.

Dimension names: B batch, F frames in the input (f video + n images), C latent channels, H, W latent
height and width, h, w token grid (H / patch), L = h * w tokens per frame, D width.

    python dit.py          # prints the parameter counts of the paper's configurations
"""

import math
from dataclasses import dataclass, asdict
from functools import lru_cache

import torch
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from attention import LocalAttention, band_mask
from ssm import Mamba2, spiral, SPIRALS


@dataclass
class DiTConfig:
    depth: int = 12
    width: int = 512  # D
    patch_size: int = 2
    in_channels: int = 16  # C of the VAE latents
    num_heads: int = 8  # local attention heads
    window_size: int = 8  # local attention, Table 1
    look_backward: int = 1
    look_forward: int = 1
    exact_windowsize: bool = True
    attn_dropout: float = 0.1
    d_state: int = 128  # Mamba-2, Table 1: state expansion factor N
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    A_init_range: tuple = (1, 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    chunk_size: int = 256
    temporal_bidirectional: bool = True  # both directions with shared weights; False = the paper's one direction
    scan: str = "auto"  # ssm.SCANS: "auto" | "kernel" | "chunked" | "recurrent"
    attn_impl: str = "sdpa"  # "sdpa" | "reference"

    def mamba_kwargs(self):
        return dict(d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, headdim=self.headdim,
                    ngroups=self.ngroups, A_init_range=tuple(self.A_init_range), dt_min=self.dt_min,
                    dt_max=self.dt_max, dt_init_floor=self.dt_init_floor, chunk_size=self.chunk_size,
                    scan=self.scan)


MODELS = {
    "S": dict(depth=6),
    "B": dict(depth=12),
    "L": dict(depth=24),
    # small enough to train on a CPU in minutes; same structure. Width 128, not 64: see check_width.
    "tiny": dict(depth=2, width=128, num_heads=4, window_size=4, d_state=16, headdim=32, chunk_size=64),
}
PAPER_PARAMS = {"S": 43.76e6, "B": 86.47e6, "L": 171.89e6}  # Table 1


def make_config(name, **overrides):
    if name not in MODELS:
        raise ValueError(f"unknown model size {name!r}; expected one of {sorted(MODELS)}")
    return DiTConfig(**{**MODELS[name], **overrides})


def check_width(cfg):
    """Refuse a width that cannot represent one output patch.

    The final layer normalises each token without a learned affine (DiT's FinalLayer), which removes the
    token's own mean and scale: 2 of its D degrees of freedom. The linear read-out then maps the remaining
    D - 2 to the p * p * C values of a patch. Near t = T the right answer is almost the input itself, so with
    D - 2 < p * p * C the epsilon error has a floor, and DDIM's x_0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar)
    multiplies it by up to ~160: the samples leave the latent range (a width-64 model with 2 x 2 x 16 patches
    sampled latents of std ~25 against the data's 1).
    """
    patch = cfg.patch_size ** 2 * cfg.in_channels
    if cfg.width < patch + 2:
        raise ValueError(f"width {cfg.width} cannot represent a {cfg.patch_size}x{cfg.patch_size}x{cfg.in_channels} "
                         f"patch ({patch} values) after the final per-token norm: use width >= {patch + 2} "
                         f"(e.g. {2 * patch})")


# ---------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------

def sincos_1d(dim, pos):
    """Transformer sin-cos embedding of positions (P,) -> (P, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = pos.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim, h, w):
    """Fixed 2-D position embedding (L, D): half the channels encode the row, half the column."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Diffusion step t -> sinusoidal features (256) -> MLP -> (B, D), as in DiT."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def spatial_tables(f, n, h, w, variant, device=None):
    """The two planes of Eq. 8 as scan tables (ssm.Mamba2.scan_tables) over a sample's (f + n) * h * w tokens, numbered
    frame by frame, row by row: plane w has one sequence per token row, its f * w tokens walked along spiral
    `variant` of the (f x w) grid; plane h one per token column, along the spiral of the (f x h) grid. Each image
    is a one-frame clip of its own (Sec. 3.4), so its rows and columns are sequences of their own.
    Returns [plane w tables, plane h tables], int32, each table (sequences, steps)."""
    return _spatial_tables(f, n, h, w, variant % len(SPIRALS), device)


@lru_cache(maxsize=None)
def _spatial_tables(f, n, h, w, variant, device):
    idx = torch.arange((f + n) * h * w).view(f + n, h, w)
    plane_w, plane_h = [], []
    for frames, clips in ((f, idx[:f][None]), (1, idx[f:, None])):  # the video; each image alone
        if clips.numel():
            rows = rearrange(clips, "c f h w -> (c h) (f w)")  # one sequence per row: its (frames x w) grid
            cols = rearrange(clips, "c f h w -> (c w) (f h)")  # one per column: its (frames x h) grid
            plane_w.append(rows[:, spiral(frames, w, variant)[0]])
            plane_h.append(cols[:, spiral(frames, h, variant)[0]])
    return [[t.to(device, torch.int32) for t in plane] for plane in (plane_w, plane_h)]


@lru_cache(maxsize=None)
def temporal_tables(f, n, L, device=None):
    """The temporal scan of Eq. 10 as a scan table: one sequence per token position of the video, its f frames in
    order; each image token is a one-step sequence of its own (Sec. 3.4). Tokens numbered as in spatial_tables."""
    idx = torch.arange((f + n) * L).view(f + n, L)
    tables = [idx[:f].t(), idx[f:].reshape(-1, 1)]  # (L, f) and (n * L, 1)
    return [t.contiguous().to(device, torch.int32) for t in tables if t.numel()]


def block_indices(cfg, f, n, h, w, device):
    """Every index tensor the blocks use, built once per forward from cached tables, for each block: the
    attention's band mask, the spatial scan tables (this block's spiral variant) and the temporal ones, for f video
    frames followed by n images. Passed in as arguments, so that a compiled block does not rebuild them at every
    call and all blocks, whatever their spiral variant, share one compiled graph."""
    mask = band_mask(h * w, cfg.window_size, cfg.look_backward, cfg.look_forward, cfg.exact_windowsize, device)
    time = temporal_tables(f, n, h * w, device)
    return [{"mask": mask, "spatial": spatial_tables(f, n, h, w, i, device), "temporal": time}
            for i in range(cfg.depth)]


# ---------------------------------------------------------------------------------------------------------
# The spatial and temporal components
# ---------------------------------------------------------------------------------------------------------

class SpatialMamba(nn.Module):
    """Bidirectional spiral scans over the (f x w) and (f x h) planes, fused by the gate of Eq. 9.

    One Mamba-2 weight set serves all four scans (two planes x spiral / reverse spiral), as in the paper's
    parameter counts. Block i is given spiral variant i (start corner and sense; block_indices), so depth sees
    all of them.
    """

    def __init__(self, cfg):
        super().__init__()
        self.mamba = Mamba2(cfg.width, **cfg.mamba_kwargs())
        self.gate_w = nn.Linear(cfg.width, cfg.width)  # W_1, b_1 of Eq. 9
        self.gate_h = nn.Linear(cfg.width, cfg.width)  # W_2, b_2

    def forward(self, x, planes):
        """x (B, F, L, D) -> (B, F, L, D). planes: spatial_tables of the (f x w) and (f x h) planes."""
        B, F, L, D = x.shape
        # Each plane: its sequences scanned along the spiral and back, summed in place (Eq. 8), then out_proj.
        y_w, y_h = (y.view(B, F, L, D) for y in self.mamba.forward_planes(x.reshape(B, F * L, D), planes))
        return torch.sigmoid(self.gate_w(y_w)) * y_w + torch.sigmoid(self.gate_h(y_h)) * y_h  # Eq. 9


class TemporalMamba(nn.Module):
    """Mamba-2 along the frames of each token position (Eq. 10).

    Bidirectional by default (forward and reverse scans summed, sharing weights): with a causal scan only,
    the first frame could never see the later ones. The paper scans one way; `temporal_bidirectional=False`.
    """

    def __init__(self, cfg):
        super().__init__()
        self.mamba = Mamba2(cfg.width, **cfg.mamba_kwargs())
        self.bidirectional = cfg.temporal_bidirectional

    def forward(self, x, tables=None):
        """x (B, F, L, D) -> (B, F, L, D). tables: temporal_tables of the clip (built here for F video frames when
        None). An image's one-frame sequences make the layer pointwise there."""
        B, F, L, D = x.shape
        tables = temporal_tables(F, 0, L, x.device) if tables is None else tables
        (y,) = self.mamba.forward_planes(x.reshape(B, F * L, D), [tables], self.bidirectional)
        return y.view(B, F, L, D)


class MedSoraBlock(nn.Module):
    def __init__(self, cfg, index):
        super().__init__()
        D = cfg.width
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = LocalAttention(D, cfg.num_heads, cfg.window_size, cfg.look_backward, cfg.look_forward,
                                   cfg.exact_windowsize, cfg.attn_dropout, cfg.attn_impl)
        self.spatial = SpatialMamba(cfg)
        self.temporal = TemporalMamba(cfg)
        # adaLN-Zero: shift, scale and gate for each of the three branches, from the step embedding.
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 9 * D))
        self.cfg, self.index = cfg, index

    def forward(self, x, c, num_frames, h, w, indices=None):
        """x (B, F, L, D), c (B, D) -> x (B, F, L, D), and the spatial component's output (B, F, L, D).
        indices: this block's entry of block_indices (built here when None)."""
        B, F, L, D = x.shape
        if indices is None:
            indices = block_indices(self.cfg, num_frames, F - num_frames, h, w, x.device)[self.index]
        (shift_a, scale_a, gate_a, shift_s, scale_s, gate_s,  # attention, spatial Mamba,
         shift_t, scale_t, gate_t) = self.adaLN(c)[:, None, None].chunk(9, dim=-1)  # temporal Mamba: (B, 1, 1, D)
        a = modulate(self.norm1(x), shift_a, scale_a)
        x = x + gate_a * self.attn(a.reshape(B * F, L, D), indices["mask"]).view(B, F, L, D)  # per frame
        s = self.spatial(modulate(self.norm2(x), shift_s, scale_s), indices["spatial"])
        x = x + gate_s * s
        x = x + gate_t * self.temporal(modulate(self.norm3(x), shift_t, scale_t), indices["temporal"])
        return x, s  # s is what the optical-flow alignment loss aligns (Sec. 3.2)


class FinalLayer(nn.Module):
    def __init__(self, D, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, patch_size * patch_size * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c)[:, None, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class MedSora(nn.Module):
    """epsilon_theta(z_t, t): latent frames (B, F, C, H, W) and steps t (B,) -> predicted noise (B, F, C, H, W)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        check_width(cfg)
        self.cfg = cfg
        D, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(D)
        self.blocks = nn.ModuleList(MedSoraBlock(cfg, i) for i in range(cfg.depth))
        self.final = FinalLayer(D, p, cfg.in_channels)
        self.recompute = False  # True: each block keeps only its inputs and recomputes the rest in the backward pass
        self._init_weights()

    def _init_weights(self):
        # DiT's recipe: xavier linears, N(0, 0.02) step MLP, and zero adaLN and output so every block starts
        # as the identity and the model as "predict zero" (adaLN-Zero). Mamba's A, D and dt keep their init.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        for layer in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, num_frames=None, return_features=False):
        """num_frames: how many leading frames form the video (default all); the rest are independent images."""
        B, F, C, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p or C != self.cfg.in_channels:
            raise ValueError(f"expected latents (B, F, {self.cfg.in_channels}, H, W) with H, W divisible by {p}, "
                             f"got {tuple(x.shape)}")
        f = F if num_frames is None else num_frames
        h, w = H // p, W // p
        tokens = self.patch_embed(rearrange(x, "b f c hh ww -> (b f) c hh ww"))  # (B*F, D, h, w)
        pos = sincos_2d(self.cfg.width, h, w).to(x.device, tokens.dtype)  # fixed, no parameters
        x = rearrange(tokens, "(b f) d h w -> b f (h w) d", b=B) + pos  # (B, F, L, D)
        c = self.t_embedder(t)  # (B, D)
        features = []
        for block, indices in zip(self.blocks, block_indices(self.cfg, f, F - f, h, w, x.device)):
            if self.recompute and torch.is_grad_enabled():  # activation memory for compute (train.py --recompute)
                x, s = checkpoint(block, x, c, f, h, w, indices, use_reentrant=False)  # same dropout masks again
            else:
                x, s = block(x, c, f, h, w, indices)
            features.append(s)
        out = self.final(x, c)  # (B, F, L, p*p*C)
        out = rearrange(out, "b f (h w) (p q c) -> b f c (h p) (w q)", h=h, p=p, q=p)
        return (out, features) if return_features else out


def compile_blocks(model, **kwargs):
    """Regional compilation: torch.compile(**kwargs) of each block rather than of the unrolled model. The blocks
    share one structure and get their index tensors as arguments (block_indices), so one traced graph serves
    every block, and compiling costs one block's time, not depth times it."""
    for block in model.blocks:
        block.compile(**kwargs)
    return model


def count_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    print(f"{'model':6s} {'depth':>5s} {'ours':>12s} {'paper':>10s} {'diff':>7s}")
    for name in ("S", "B", "L", "tiny"):
        cfg = make_config(name)
        with torch.device("meta"):
            n = count_params(MedSora(cfg))
        paper = PAPER_PARAMS.get(name)
        ref = f"{paper / 1e6:9.2f}M {100 * (n - paper) / paper:+6.2f}%" if paper else ""
        print(f"{name:6s} {cfg.depth:5d} {n:12,d} {ref}")
    print("config B:", asdict(make_config("B")))
