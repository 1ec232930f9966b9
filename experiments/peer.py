"""
The peer MedSora is compared with (paper Fig. 6): a Latte / Endora-style video transformer with the interface of
dit.MedSora, for benchmark.py's side-by-side tables. Each block runs global self-attention over each frame's
tokens, self-attention along the frames of each token position, and an MLP, each a residual branch under
adaLN-Zero; attention is PyTorch's SDPA, so flash attention where the GPU has it, which keeps the comparison
fair to attention. Joint image-video input is handled as in MedSora: images are one-frame clips of their own.

Dimension names as in dit.py: B batch, F frames (f video + n images), C channels, H, W latent size, h, w token
grid, L = h * w tokens per frame, D width, nh heads, hd head dim.

    python -m experiments.peer         # parameter counts beside MedSora's
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import dit


def per_clip(fn, x, num_frames):
    """Apply a frame-mixing fn(clips, kind) to the video clip x[:, :f] (kind "video") and to every image as a
    one-frame clip of its own (kind "image"). x (B, F, L, D) with F = f video frames + n images."""
    video, images = x[:, :num_frames], x[:, num_frames:]
    outs = [fn(video, "video")] if num_frames > 0 else []
    if images.shape[1] > 0:
        one_frame_clips = rearrange(images, "b n l d -> (b n) 1 l d")
        outs.append(rearrange(fn(one_frame_clips, "image"), "(b n) 1 l d -> b n l d", b=x.shape[0]))
    return torch.cat(outs, dim=1)


class PeerBlock(nn.Module):
    """Global attention over each frame's L tokens, attention over each token position's frames, an MLP:
    three residual branches under adaLN-Zero, with SDPA (flash attention on GPUs that have it)."""

    def __init__(self, D, num_heads, mlp_ratio=4, attn_impl="sdpa"):
        super().__init__()
        self.num_heads, self.attn_impl = num_heads, attn_impl
        self.norms = nn.ModuleList(nn.LayerNorm(D, elementwise_affine=False, eps=1e-6) for _ in range(3))
        self.qkv_space, self.out_space = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.qkv_time, self.out_time = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, mlp_ratio * D), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * D, D))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 9 * D))

    def attend(self, x, qkv, out):
        """Full self-attention over the second axis of x (N, S, D)."""
        if x.shape[1] == 1:  # one key: the softmax is 1 and attention returns the value (an image along time)
            D = x.shape[-1]
            return out(F.linear(x, qkv.weight[2 * D:], qkv.bias[2 * D:]))
        q, k, v = rearrange(qkv(x), "n s (three nh hd) -> three n nh s hd", three=3, nh=self.num_heads)
        if self.attn_impl == "reference":  # softmax(q k^T / sqrt(hd)) v, written out: what SDPA computes
            y = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return out(rearrange(y, "n nh s hd -> n s (nh hd)"))

    def forward(self, x, c, num_frames):
        """x (B, F, L, D), c (B, D) -> (B, F, L, D); images (the frames after num_frames) attend only to themselves
        along time, as in MedSora."""
        B, F_, L, D = x.shape
        mods = self.adaLN(c)[:, None, None].chunk(9, dim=-1)  # (B, 1, 1, D) each
        (shift_s, scale_s, gate_s), (shift_t, scale_t, gate_t), (shift_m, scale_m, gate_m) = (
            mods[0:3], mods[3:6], mods[6:9])
        a = dit.modulate(self.norms[0](x), shift_s, scale_s)
        x = x + gate_s * self.attend(a.reshape(B * F_, L, D), self.qkv_space, self.out_space).view(B, F_, L, D)

        def along_time(v, kind):  # v (b, f, L, D): attention over the f frames of each token position
            b = v.shape[0]
            v = rearrange(v, "b f l d -> (b l) f d")
            return rearrange(self.attend(v, self.qkv_time, self.out_time), "(b l) f d -> b f l d", b=b)
        x = x + gate_t * per_clip(along_time, dit.modulate(self.norms[1](x), shift_t, scale_t), num_frames)
        return x + gate_m * self.mlp(dit.modulate(self.norms[2](x), shift_m, scale_m))


class PeerTransformer(nn.Module):
    """epsilon_theta(z_t, t) with the interface of dit.MedSora: patches, sin-cos positions in space and (for the
    video frames) in time, PeerBlocks, DiT's final layer; adaLN-Zero, so it starts as "predict zero"."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embedder = dit.TimestepEmbedder(D)
        self.blocks = nn.ModuleList(PeerBlock(D, cfg.num_heads, attn_impl=cfg.attn_impl) for _ in range(cfg.depth))
        self.final = dit.FinalLayer(D, p, cfg.in_channels)
        for layer in [b.adaLN[-1] for b in self.blocks] + [self.final.adaLN[-1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, num_frames=None):
        B, F_, C, H, W = x.shape
        p, D = self.cfg.patch_size, self.cfg.width
        f, h, w = F_ if num_frames is None else num_frames, H // p, W // p
        tokens = self.patch_embed(rearrange(x, "b f c hh ww -> (b f) c hh ww"))  # (B*F, D, h, w)
        x = rearrange(tokens, "(b f) d h w -> b f (h w) d", b=B) + dit.sincos_2d(D, h, w).to(x.device, tokens.dtype)
        time_pos = dit.sincos_1d(D, torch.arange(f)).to(x.device, tokens.dtype)  # (f, D): video frames only
        x = torch.cat([x[:, :f] + time_pos[None, :, None], x[:, f:]], dim=1)  # (B, F, L, D)
        c = self.t_embedder(t)
        for block in self.blocks:
            x = block(x, c, f)
        out = self.final(x, c)  # (B, F, L, p*p*C)
        return rearrange(out, "b f (h w) (p q c) -> b f c (h p) (w q)", h=h, p=p, q=p)


if __name__ == "__main__":
    for name in ("S", "B", "L"):
        cfg = dit.make_config(name)
        with torch.device("meta"):
            ours, theirs = dit.count_params(dit.MedSora(cfg)), dit.count_params(PeerTransformer(cfg))
        print(f"MedSora-{name}: {ours:,d} parameters; the peer at its size: {theirs:,d}")
