"""
Denoising reuse for MedSora (Dr. Mo, paper 002): skip most frames' early denoising steps.

Equation numbers in this file are Dr. Mo's (paper 002), not MedSora's. The comparator, a training-free block
cache, is cache.py.

The idea (Dr. Mo Sec. III-IV). Early denoising steps lay down coarse structure, and how it moves from frame to frame
stays the same over most steps. So most frames can skip those steps:
  - a few base frames are denoised from T down to a transition step t*;
  - the other frames' latents at t* are estimated by moving the base latents with learned inter-frame motion;
  - everything is then denoised from t* to 0.

Adapting it to MedSora. Dr. Mo's backbone (Stable Diffusion) denoises each frame alone; MedSora denoises the latent
frames of a clip together (its temporal scans mix them). So here:
  1. The base frames, the first R latent frames (R = --base-frames, 2 by default), are denoised alone from T to t*.
     The temporal scans accept any number of frames, so MedSora simply runs on an R-frame clip.
  2. At t*, each later latent frame n >= R is frame n - 1 moved by a predicted motion: z^n = W(z^{n-1}, M^{n-1,n}).
  3. All f latent frames are denoised together from t* to 0 with the same DDIM as plain sampling
     (t* = T is plain DDIM, exactly).
The transition step is one of P probe steps (899, 799, ..., 99 with the default 999 ... 99; probe 0, T itself, means
no reuse). It is fixed (--reuse-t) or chosen per video by the step selector, and rounded down to the sampler's
DDIM grid, as the paper does with fast samplers: the later grid step, so more reuse.

Which frames are base frames. A 17-frame clip has f = 5 latent frames. The causal VAE encodes pixel frame 0
alone as latent frame 0, and every 4 further pixel frames as latent frames 1-4. With R = 2 the base pair is latent
frames 0 and 1. Their motion is the observed motion, and the ConvLSTM carries it on to the pairs (1, 2) ... (3, 4).

What it gains. A fraction q of the steps come before t*; in those, only R of the f frames go through MedSora (plus
one more R-frame step at t*, for its motion). So a clip costs about (1 - q) + q R / f of plain DDIM:
  - 17 frames (f = 5), q = 0.6: 0.64, i.e. 1.6x faster;
  - 65 frames (f = 17): 0.47, 2.1x;
  - 257 frames (f = 65): 0.42, 2.4x.
So the gain grows with the video's length. The step selector decides as the probes arrive: after each probe it
either picks a t* it has already passed (its latent was kept) or lets the base frames go on. So they run no further
than the probe where it decides.

The networks (Sec. IV-B, IV-C), all small and trained on a finished MedSora checkpoint:
  MotionNet (the MTN). Eq. 3's motion matrix of two frames holds the cosine similarity of every token pair. Here
  it is kept as a cost volume: for each token of frame j, the similarity to frame i's token at every offset (dy, dx)
  within `radius`. The default radius covers the whole token grid, so nothing of Eq. 3 is lost; it is the same
  matrix, indexed by offset. A softmax over the offsets makes it a soft correspondence, and W moves the latent's
  patch tokens with it.
    g_phi1  a small conv net per MedSora block, on that block's spatial features of each frame   (Eq. 5)
    g_phi2  a learned temperature on the blocks' mean cosine, plus an MLP over them, entry by entry  (Eq. 5)
    g_phi3  the surrogate: a weighted sum of the motion logits at the probes from T to t*, with the
            weights from an MLP of the step                                                        (Eq. 7)
    g_phi4  a ConvLSTM over consecutive pairs' surrogates, predicting the next pair's              (Eq. 9)
  Loss Eq. 11 = 0.9 Eq. 6 (motion of the step residuals) + 1 Eq. 8 (surrogate on the latents) + 0.05 Eq. 10
  (prediction of the next pair's surrogate).
  StepSelector (the DSS). A bidirectional GRU and an MLP over the base pair's motion at the probes seen so far.
  The later probes are hidden at random in training, which is the paper's random mask. It picks t* among probes
  1..P-1, trained by cross-entropy against Eq. 12's t* = argmin_t log(beta t) L(t), where L(t) is the error of the
  whole reuse estimate of frames R..f-1 at t (chained warps with predicted motion, as sampling makes it).

Training data. `collect` runs each noise twice: all f frames together (plain DDIM, whose later frames are the
targets) and the R base frames alone (what sampling runs before t*; their features and latents feed the base
pair's motion, the selector and the estimate).

    python reuse.py train --run runs/medsora                # -> runs/medsora/reuse/reuse.pt
    python sample.py --reuse runs/medsora/reuse/reuse.pt    # t* chosen per video by the step selector
    python sample.py --reuse runs/medsora/reuse/reuse.pt --reuse-t 599   # a fixed t*

Dimension names: B batch, P probes, f latent frames, R base frames, C latent channels, H, W latent size,
h, w token grid, L = h w, D MedSora width, d motion feature width, K = (2 radius + 1)^2 offsets, t diffusion step.
"""

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

import checkpoint
import dit
import distributed
import pipeline
from diffusion import Diffusion

NEG = -1e4  # the logit of an offset that leaves the grid: finite, so a weighted sum of logits stays a number


# ---------------------------------------------------------------------------------------------------------
# Motion as a cost volume, and moving latents with it
# ---------------------------------------------------------------------------------------------------------

def to_tokens(z, p):
    """Latent frames (B, C, H, W) -> patch tokens on the token grid (B, C p p, h, w): what MedSora sees as a token."""
    return F.pixel_unshuffle(z, p)


def from_tokens(tokens, p):
    return F.pixel_shuffle(tokens, p)


def offsets(radius):
    """(K, 2) the (dy, dx) of each volume channel, row-major over the (2 radius + 1)^2 window."""
    r = torch.arange(-radius, radius + 1)
    return torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)


def offset_index(h, w, radius, device):
    """Where each offset leads: (K, L) flat source token index from each token (0 where it leaves the grid),
    and (K, L) whether it stays on the grid. Built once per grid and device."""
    return _offset_index(h, w, radius, str(torch.device(device)))


@lru_cache(maxsize=None)
def _offset_index(h, w, radius, device):
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy, dx = offsets(radius).T
    sy, sx = y.flatten()[None] + dy[:, None], x.flatten()[None] + dx[:, None]  # (K, L)
    valid = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
    return torch.where(valid, sy * w + sx, 0).to(device), valid.to(device)


def valid_offsets(h, w, radius, device):
    """(K, h, w) bool: whether offset k from token (y, x) lands on the grid."""
    return offset_index(h, w, radius, device)[1].view(-1, h, w)


def cosine_volume(src, dst, radius):
    """Eq. 3 as a cost volume: src, dst (B, d, h, w) token features of frames i and j -> (B, K, h, w), where
    [k, y, x] is the cosine similarity of dst's token (y, x) and src's token (y + dy_k, x + dx_k); 0 off the grid.
    It is read off Eq. 3's full matrix of token pairs, one matrix product."""
    B, d, h, w = src.shape
    sim = torch.einsum("bdl,bdm->blm", F.normalize(dst, dim=1).flatten(2), F.normalize(src, dim=1).flatten(2))
    index, valid = offset_index(h, w, radius, src.device)  # (K, L)
    vol = sim.gather(2, index.T.expand(B, -1, -1)).transpose(1, 2)  # (B, K, L)
    return (vol * valid).view(B, -1, h, w)


def warp(tokens, probs, radius):
    """W: the tokens of frame i (B, c, h, w) moved to frame j by a soft correspondence probs (B, K, h, w), which
    sums to 1 over the offsets: token (y, x) of j = sum_k probs_k * token (y + dy_k, x + dx_k) of i. The
    correspondence is scattered into the (L, L) matrix of Eq. 3's "M x z" and applied as one matrix product."""
    B, c, h, w = tokens.shape
    index, valid = offset_index(h, w, radius, tokens.device)
    M = tokens.new_zeros(B, h * w, h * w).scatter_add(2, index.T.expand(B, -1, -1),
                                                      (probs.flatten(2) * valid).transpose(1, 2))  # (B, L_j, L_i)
    return torch.bmm(M, tokens.flatten(2).transpose(1, 2)).transpose(1, 2).view(B, c, h, w)


def step_embedding(ts, dim=64):
    """(P,) diffusion steps -> (P, dim) sinusoidal features of t / T, T = 1000."""
    return dit.sincos_1d(dim, torch.as_tensor(ts, dtype=torch.float64) / 1000 * 100).float()


# ---------------------------------------------------------------------------------------------------------
# The networks
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ReuseConfig:
    blocks: tuple  # the MedSora blocks whose spatial features give the motion (Eq. 5's b_1 .. b_k)
    width: int  # D: MedSora's width
    grid: tuple  # (h, w): the token grid
    patch_size: int  # MedSora's p
    probes: tuple  # P diffusion steps, largest first, where the motion is measured: the candidates for t*
    base_frames: int = 2  # R
    radius: int = -1  # offsets searched; -1: the whole grid (the full matrix of Eq. 3)
    feat_dim: int = 64  # d: g_phi1's output
    hidden: int = 64
    beta: float = 1.0  # Eq. 12's beta

    def __post_init__(self):
        self.blocks, self.grid, self.probes = tuple(self.blocks), tuple(self.grid), tuple(int(t) for t in self.probes)
        if self.radius == -1:
            self.radius = max(self.grid) - 1
        if self.radius < 1 or self.base_frames < 2 or min(self.blocks, default=-1) < 0:
            raise ValueError(f"radius {self.radius}, base_frames {self.base_frames}, blocks {self.blocks}: the radius "
                             f"is -1 (the whole grid) or at least 1, the motion needs a pair of base frames (2 or more), "
                             f"and blocks are indices from 0")
        if (len(self.probes) < 2 or list(self.probes) != sorted(set(self.probes), reverse=True)
                or self.beta * min(self.probes) <= 1):
            raise ValueError(f"probes {self.probes} must be 2 or more, distinct, largest first, with beta * t > 1 for "
                             f"each (Eq. 12 weighs by log(beta t)); beta is {self.beta}")

    @property
    def K(self):
        return (2 * self.radius + 1) ** 2


class ConvLSTMCell(nn.Module):
    """A convolutional LSTM cell (Shi et al. 2015) on the token grid: g_phi4 of Eq. 9."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.conv = nn.Conv2d(channels + hidden, 4 * hidden, 3, padding=1)
        self.hidden = hidden

    def forward(self, x, state=None):
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.hidden, *x.shape[2:])
            state = (zeros, zeros)
        h, c = state
        i, f, o, g = self.conv(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class MotionNet(nn.Module):
    """The Motion Transformation Network (Sec. IV-B): motion logits of frame pairs, the surrogate over steps,
    the prediction of later pairs' motion, and the estimate of later frames' latents at t*."""

    def __init__(self, cfg: ReuseConfig):
        super().__init__()
        self.cfg = cfg
        D, d, hid = cfg.width, cfg.feat_dim, cfg.hidden
        self.proj = nn.ModuleList(nn.Sequential(nn.Conv2d(D, d, 1), nn.GELU(), nn.Conv2d(d, d, 3, padding=1))
                                  for _ in cfg.blocks)  # g_phi1, one per block
        # g_phi2: applied at every (offset, token) entry, so kept narrow (16): its activations are K L wide
        self.mix = nn.Sequential(nn.Linear(len(cfg.blocks), 16), nn.GELU(), nn.Linear(16, 1))
        nn.init.zeros_(self.mix[-1].weight)
        nn.init.zeros_(self.mix[-1].bias)
        # at initialisation the logits are 10 x the blocks' mean cosine: a sharp correspondence from the start
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.step_score = nn.Sequential(nn.Linear(64, hid), nn.GELU(), nn.Linear(hid, 1))  # g_phi3
        self.cell = ConvLSTMCell(cfg.K, hid)  # g_phi4
        self.head = nn.Conv2d(hid, cfg.K, 1)

    def project(self, feats):
        """Each block's spatial features of some frames, [(N, L, D)] -> [(N, d, h, w)] (g_phi1)."""
        h, w = self.cfg.grid
        return [p(rearrange(s.float(), "n (h w) d -> n d h w", h=h, w=w)) for p, s in zip(self.proj, feats)]

    def logits(self, src, dst):
        """Motion logits (N, K, h, w) from frame i to frame j, given their projected features ([(N, d, h, w)])."""
        cos = torch.stack([cosine_volume(a, b, self.cfg.radius) for a, b in zip(src, dst)], -1)  # (N, K, h, w, k)
        out = self.log_scale.exp() * cos.mean(-1) + self.mix(cos).squeeze(-1)  # Eq. 5: g_phi2 over the blocks
        return out.masked_fill(~valid_offsets(*self.cfg.grid, self.cfg.radius, out.device), NEG)

    def surrogate(self, seq, upto):
        """Eq. 7: the surrogate motion of each sample from its probes 0..upto (T down to t*): seq (B, P, ..., K, h, w)
        logits at every probe, upto (B,) probe indices -> (B, ..., K, h, w)."""
        P = seq.shape[1]
        score = self.step_score(step_embedding(self.cfg.probes[:P]).to(seq.device)).squeeze(-1)  # (P,)
        later = torch.arange(P, device=seq.device)[None] > upto[:, None]  # probes past t*: not seen yet
        weight = torch.softmax(score.expand(len(upto), P).masked_fill(later, -math.inf), dim=1)  # (B, P)
        return torch.einsum("bp,bp...->b...", weight, seq)

    def predict(self, pairs, n_future):
        """Eq. 9: the ConvLSTM over consecutive pairs' motion (a list of logits (B, K, h, w), pair n = frames
        (n, n+1)). Returns the logits of pairs 1 .. len(pairs) + n_future - 1: each predicted from the pairs
        before it, the given ones first, then its own predictions fed back."""
        valid = valid_offsets(*self.cfg.grid, self.cfg.radius, pairs[0].device)
        state, preds = None, []
        for n in range(len(pairs) + n_future - 1):
            x = pairs[n] if n < len(pairs) else preds[-1]
            state = self.cell(torch.softmax(x, 1), state)
            preds.append(self.head(state[0]).masked_fill(~valid, NEG))
        return preds

    def extend(self, z_base, base_pairs, f):
        """The latents of all f frames at t*: the base frames' z_base (B, R, C, H, W), and each later frame as the
        frame before it moved by the predicted motion. base_pairs: the surrogate logits of the R - 1 base pairs."""
        p, r = self.cfg.patch_size, self.cfg.radius
        frames = list(z_base.unbind(1))
        future = self.predict(base_pairs, f - len(frames))[len(base_pairs) - 1:]
        for logits in future:
            frames.append(from_tokens(warp(to_tokens(frames[-1], p), torch.softmax(logits, 1), r), p))
        return torch.stack(frames, 1)


class StepSelector(nn.Module):
    """The Denoising Step Selector (Sec. IV-C, Fig. 6): a bidirectional GRU and an MLP over the base pair's motion
    at the probes seen so far -> logits over the probes as t* (probe 0, T itself, is never a choice)."""

    def __init__(self, cfg: ReuseConfig):
        super().__init__()
        self.cfg = cfg
        hid = cfg.hidden
        self.inp = nn.Sequential(nn.Linear(cfg.K + 2 + 64, hid), nn.GELU())
        self.rnn = nn.GRU(hid, hid, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Linear(2 * hid, hid), nn.GELU(), nn.Linear(hid, 1))

    def forward(self, logits, seen=None):
        """logits (B, P, K, h, w): the base pair's motion at each probe; seen (B,): how many probes each video has
        seen (the rest of its rows are ignored; default all) -> (B, P)."""
        B, P = logits.shape[:2]
        seen = torch.full((B,), P, device=logits.device) if seen is None else seen
        shown = (torch.arange(P, device=logits.device)[None] < seen[:, None]).float()[..., None]  # (B, P, 1)
        probs = torch.softmax(logits, 2)
        where = probs.mean((3, 4))  # (B, P, K): how the tokens move, over the whole grid
        sure = probs.amax(2).mean((2, 3))[..., None]  # (B, P, 1): how sharp the correspondence is
        steps = step_embedding(self.cfg.probes).to(logits.device).expand(B, -1, -1)
        y, _ = self.rnn(self.inp(torch.cat([where * shown, sure * shown, shown, steps], -1)))
        out = self.head(y).squeeze(-1)
        return out.masked_fill(torch.arange(P, device=out.device) == 0, -math.inf)


# ---------------------------------------------------------------------------------------------------------
# Training: trajectories of the frozen MedSora, Eq. 6-11, Eq. 12's labels
# ---------------------------------------------------------------------------------------------------------

def probe_grid(probes, ts):
    """Each probe's index on a DDIM grid ts (largest first): the first grid step at or below it (rounded down, as
    the paper does with fast samplers: the later step, so more reuse). Distinct probes need distinct steps."""
    index = [int(np.argmax(ts <= t)) if (ts <= t).any() else len(ts) - 1 for t in probes]
    if len(set(index)) < len(index):
        raise ValueError(f"{len(ts)} DDIM steps are too few for the {len(probes)} probes {probes}: two share a grid "
                         f"step; sample with more steps")
    return index


def recorder(ts, grid, blocks):
    """A ddim_sample callback, and the dict it fills: at each probe's grid step (grid: indices into ts), the latent
    before the step, the step's change (Eq. 1's residual) and the spatial features of `blocks` (B, f, k, L, D)."""
    at = {int(ts[i]): n for n, i in enumerate(grid)}
    kept = {}

    def keep(t, x, out, x_next):
        if t in at:
            kept[at[t]] = (x, x_next - x, torch.stack([out[1][b] for b in blocks], 2))
    return keep, kept


@torch.no_grad()
def collect(eps, noise, steps, cfg, diffusion):
    """Two DDIM runs of `noise` (B, f, C, H, W), each stopped after the last probe: all f frames together (plain
    sampling), and the R base frames alone (what reuse runs before t*). At each probe, each keeps the latent
    before the step (z), the step's change (dz) and the features of cfg.blocks (feats, bf16), on the CPU:
    {"z", "dz": (B, P, f, C, H, W), "feats": (B, P, f, k, L, D), "base_z", "base_dz", "base_feats": the same, R frames}."""
    ts = diffusion.timesteps(steps)
    grid = probe_grid(cfg.probes, ts)
    out = {}
    for prefix, frames in (("", noise.shape[1]), ("base_", cfg.base_frames)):
        keep, kept = recorder(ts, grid, cfg.blocks)
        diffusion.ddim_sample(eps, (len(noise), frames, *noise.shape[2:]), steps, noise=noise[:, :frames],
                              device=noise.device, stop=grid[-1] + 1, callback=keep, num_frames=frames,
                              return_features=True)
        for i, (key, dtype) in enumerate((("z", torch.float32), ("dz", torch.float32), ("feats", torch.bfloat16))):
            out[prefix + key] = torch.stack([kept[n][i].to("cpu", dtype) for n in range(len(grid))], 1)
    return out


def pair_logits(mtn, feats):
    """The motion logits of every consecutive pair at every probe: feats (B, P, f, k, L, D) -> (B, P, f-1, K, h, w)."""
    B, P, f = feats.shape[:3]
    proj = mtn.project(list(rearrange(feats, "b p f k l d -> k (b p f) l d")))
    proj = [rearrange(x, "(b p f) d h w -> b p f d h w", b=B, p=P) for x in proj]
    src = [x[:, :, :-1].flatten(0, 2) for x in proj]
    dst = [x[:, :, 1:].flatten(0, 2) for x in proj]
    return mtn.logits(src, dst).unflatten(0, (B, P, f - 1))


def moved(mtn, z, logits):
    """Frames n moved to frames n + 1: z (..., f, C, H, W) latents, logits (..., f-1, K, h, w) -> (..., f-1, C, H, W)."""
    p, r = mtn.cfg.patch_size, mtn.cfg.radius
    lead = z.shape[:-4]
    src = to_tokens(z[..., :-1, :, :, :].flatten(0, -4), p)
    out = warp(src, torch.softmax(logits.flatten(0, -4), 1), r)
    return from_tokens(out, p).unflatten(0, (*lead, z.shape[-4] - 1))


def motion_loss(mtn, batch, weights=(0.9, 1.0, 0.05), generator=None):
    """Eq. 11 = alpha Eq. 6 + beta Eq. 8 + gamma Eq. 10 on a batch of trajectories (collect's keys), over the pairs
    of both runs. Each sample takes one t* at random among probes 1..P-1. Returns (total, {term: value})."""
    z = batch["z"]
    B, P, f = z.shape[:3]
    R = mtn.cfg.base_frames
    runs = [(batch[p + "z"], batch[p + "dz"], pair_logits(mtn, batch[p + "feats"])) for p in ("", "base_")]

    def l1(estimate, target):  # the summed error and the element count, so both runs weigh by their pairs
        return (estimate - target).abs().sum(), target.numel()
    k = torch.randint(1, P, (B,), generator=generator).to(z.device)
    six, eight, surrogates = [], [], []
    for zz, dz, logits in runs:
        six.append(l1(moved(mtn, dz, logits), dz[:, :, 1:]))  # Eq. 6: each step's residual, moved by its motion
        surrogate = mtn.surrogate(logits, k)  # (B, pairs, K, h, w): Eq. 7, over the probes T .. t*
        z_star = zz[torch.arange(B), k]
        eight.append(l1(moved(mtn, z_star, surrogate), z_star[:, 1:]))  # Eq. 8: it moves the latents at t*
        surrogates.append(surrogate.detach())
    residual, latent = (sum(v for v, _ in t) / sum(n for _, n in t) for t in (six, eight))
    # Eq. 10: the ConvLSTM predicts each pair's surrogate from the pairs before it, as sampling chains them: the
    # base pairs from the base run, the later pairs from the plain one (inputs and targets held fixed)
    chain = list(surrogates[1].unbind(1)) + list(surrogates[0][:, R - 1:].unbind(1))
    preds = mtn.predict(chain, 0)
    motion = z.new_zeros(())
    if preds:
        target = torch.softmax(torch.stack(chain[1:], 1), 2)
        motion = (torch.softmax(torch.stack(preds, 1), 2) - target).abs().sum(2).mean()
    a, b, g = weights
    return a * residual + b * latent + g * motion, {"eq6": residual.item(), "eq8": latent.item(), "eq10": motion.item()}


@torch.no_grad()
def reuse_errors(mtn, batch):
    """L(t) of Eq. 12 at every probe: the mean L1 error of the reuse estimate of frames R..f-1 at that t*, made as
    sampling makes it (the base run's latents and base-pair surrogate, the ConvLSTM's predictions, warps chained
    from frame R-1), against those frames in the plain run. (B, P); probe 0 (T: no reuse) is infinite."""
    z, base_z = batch["z"], batch["base_z"]
    logits = pair_logits(mtn, batch["base_feats"])  # (B, P, R-1, K, h, w)
    B, P, f = z.shape[:3]
    R = mtn.cfg.base_frames
    errors = [torch.full((B,), math.inf, device=z.device)]
    for k in range(1, P):
        base = mtn.surrogate(logits, torch.full((B,), k, device=z.device))  # (B, R-1, K, h, w)
        estimate = mtn.extend(base_z[:, k], list(base.unbind(1)), f)
        errors.append((estimate[:, R:] - z[:, k, R:]).abs().flatten(1).mean(1))
    return torch.stack(errors, 1)


def transition_labels(errors, cfg):
    """Eq. 12: t* = argmin_t log(beta t) L(t) over probes 1..P-1: errors (B, P) -> probe indices (B,)."""
    weight = torch.log(cfg.beta * torch.tensor(cfg.probes, dtype=errors.dtype, device=errors.device))
    return (weight * errors)[:, 1:].argmin(1) + 1


# ---------------------------------------------------------------------------------------------------------
# Sampling with reuse
# ---------------------------------------------------------------------------------------------------------

class ReuseSampler:
    """pipeline.generate's sampler: denoising reuse (this file's header). t_star: a fixed transition step, rounded
    down to the probes (999 or more: plain DDIM); None lets the step selector choose per video. self.stats gets one
    dict per video, in order: its t*, and the frame-steps it cost beside plain DDIM's (one latent frame through
    MedSora at one step)."""

    def __init__(self, mtn, dss, t_star=None, diffusion=None):
        self.mtn, self.dss, self.t_star = mtn, dss, t_star
        self.cfg, self.diffusion, self.stats = mtn.cfg, diffusion or Diffusion(), []

    def probe_of(self, t_star):
        """The probe of a fixed t*: the first at or below it (the lowest probe for anything under that)."""
        below = [n for n, t in enumerate(self.cfg.probes) if t <= t_star]
        return below[0] if below else len(self.cfg.probes) - 1

    @torch.no_grad()
    def __call__(self, eps, noise, steps, device, clip_x0=None):
        B, f = noise.shape[:2]
        R, P = self.cfg.base_frames, len(self.cfg.probes)
        ddim = dict(steps=steps, device=device, clip_x0=clip_x0)
        fixed = None if self.t_star is None else self.probe_of(self.t_star)
        if f <= R or fixed == 0:  # nothing to estimate, or t* = T: plain DDIM
            self.stats += [{"t_star": 999, "frame_steps": f * steps, "plain_frame_steps": f * steps}
                           for _ in range(B)]
            return self.diffusion.ddim_sample(eps, noise.shape, noise=noise, num_frames=f, **ddim)
        ts = self.diffusion.timesteps(steps)
        grid = probe_grid(self.cfg.probes, ts)

        # 1. the base frames alone, probe by probe, until every video's t* is known: fixed, or the selector's
        # choice from the probes seen so far (a t* it has passed is fine: each probe's latent is kept)
        x = noise[:, :R].clone()
        latent, logits = [], []  # per probe: (B, R, C, H, W) and (B, R-1, K, h, w), for the videos still running
        choice = torch.zeros(B, dtype=torch.long, device=noise.device)
        base_steps = torch.zeros(B, dtype=torch.long)
        active = torch.arange(B, device=noise.device)
        for k in range(P):
            start = grid[k - 1] + 1 if k else 0
            keep, kept = recorder(ts, [grid[k]], self.cfg.blocks)
            x[active] = self.diffusion.ddim_sample(eps, (len(active), R, *noise.shape[2:]), noise=x[active],
                                                   start=start, stop=grid[k] + 1, callback=keep, num_frames=R,
                                                   return_features=True, **ddim)
            base_steps[active.cpu()] = grid[k] + 1
            z_k, _, feats = kept[0]
            latent.append(torch.zeros_like(x).index_copy_(0, active, z_k))
            pair = pair_logits(self.mtn, feats[:, None])[:, 0]  # (n, R-1, K, h, w)
            logits.append(pair.new_zeros(B, *pair.shape[1:]).index_copy_(0, active, pair))
            if fixed is not None:
                if k < fixed:
                    continue
                choice[active], active = k, active[:0]
            elif k >= 1:
                seen = torch.full((len(active),), k + 1, device=noise.device)
                motion = torch.stack(logits + [torch.zeros_like(logits[0])] * (P - k - 1), 1)[active, :, 0]
                pick = self.dss(motion, seen).argmax(1)
                decided = pick <= k
                choice[active[decided]] = pick[decided]
                active = active[~decided]
            if not len(active):
                break

        # 2. the later frames at t*, moved from the base frames; 3. all frames together from t*
        z0, record = torch.empty_like(noise), [None] * B
        for k in choice.unique().tolist():  # videos that share a t* are denoised together
            idx = (choice == k).nonzero().squeeze(1)
            seq = torch.stack(logits[:k + 1], 1)[idx]  # (n, k+1, R-1, K, h, w)
            base = self.mtn.surrogate(seq, torch.full((len(idx),), k, device=noise.device))
            z_star = self.mtn.extend(latent[k][idx], list(base.unbind(1)), f)
            z0[idx] = self.diffusion.ddim_sample(eps, z_star.shape, noise=z_star, start=grid[k], num_frames=f, **ddim)
            for i in idx.tolist():
                record[i] = {"t_star": int(ts[grid[k]]), "frame_steps": R * int(base_steps[i]) + f * (steps - grid[k]),
                             "plain_frame_steps": f * steps}
        self.stats += record
        return z0


def load(path, device="cpu"):
    """(MotionNet, StepSelector, the file's contents) from a reuse.py train file, loaded strictly."""
    state = checkpoint.load(path, "denoising-reuse networks (python reuse.py train)")
    if not {"mtn", "dss", "config"} <= set(state):
        raise ValueError(f"{path} is not a reuse.py train file (it has {', '.join(sorted(state)[:6])})")
    cfg = ReuseConfig(**state["config"])
    mtn, dss = MotionNet(cfg), StepSelector(cfg)
    for net, key in ((mtn, "mtn"), (dss, "dss")):
        net.load_state_dict(checkpoint.check_finite(state[key], path, key))
    return mtn.to(device).eval(), dss.to(device).eval(), state


def check_model(cfg, model_cfg, grid, path):
    """Refuse reuse networks trained for another architecture or token grid than the model and clips at hand."""
    ours = (model_cfg.width, model_cfg.patch_size, tuple(grid))
    if (cfg.width, cfg.patch_size, cfg.grid) != ours or max(cfg.blocks) >= model_cfg.depth:
        raise ValueError(f"{path} was trained on a MedSora of width {cfg.width}, patch {cfg.patch_size}, token grid "
                         f"{cfg.grid}, blocks {cfg.blocks}; this one has width {ours[0]}, patch {ours[1]}, grid "
                         f"{ours[2]}, depth {model_cfg.depth}: train it again with python reuse.py train --ckpt ...")


# ---------------------------------------------------------------------------------------------------------
# python reuse.py train
# ---------------------------------------------------------------------------------------------------------

def default_blocks(depth):
    """The middle block and the last: the features of two depths (Dr. Mo takes several U-Net scales)."""
    return tuple(sorted({max(0, depth // 2 - 1), depth - 1}))


def trajectories(model, f, latent_size, n, first, steps, cfg, device, amp, batch_size, seed, desc):
    """Trajectories (collect) of n videos, numbered first .. first + n - 1, in batches. Video i starts from noise
    seeded by (seed, i, 2): never the noise sample.py draws for a video (seeded by (seed, i))."""
    eps = pipeline.autocast_model(model, device, amp)
    parts = []
    for start in tqdm(range(first, first + n, batch_size), desc=desc):
        idx = range(start, min(start + batch_size, first + n))
        noise = pipeline.video_noise(idx, f, model.cfg.in_channels, latent_size, seed, 2)
        parts.append(collect(eps, noise.to(device), steps, cfg, Diffusion()))
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


def batches(data, batch_size, gen, device):
    n = len(data["z"])
    while True:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if len(idx) == batch_size or n < batch_size:
                yield {k: v[idx].to(device).float() for k, v in data.items()}


def decide(dss, motion):
    """The step selector's choice as sampling makes it, probe by probe: motion (B, P, K, h, w) of the base pair ->
    (t* probe (B,), probes seen when it decided (B,))."""
    B, P = motion.shape[:2]
    choice, seen = torch.zeros(B, dtype=torch.long), torch.full((B,), P)
    undecided = torch.ones(B, dtype=torch.bool)
    for k in range(1, P):
        pick = dss(motion, torch.full((B,), k + 1, device=motion.device)).argmax(1).cpu()
        now = undecided & (pick <= k)
        choice[now], seen[now], undecided = pick[now], k + 1, undecided & ~now
    return choice, seen


def train_motion_net(train_set, cfg, args, gen, device):
    """The motion network, trained on the trajectories' base-frame features and latents (Eq. 11)."""
    mtn = MotionNet(cfg).to(device)
    opt = torch.optim.AdamW(mtn.parameters(), lr=args.lr)
    data = batches(train_set, args.batch_size, gen, device)
    bar = tqdm(range(args.iters), desc="motion network (Eq. 11)")
    for it in bar:
        loss, terms = motion_loss(mtn, next(data), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mtn.parameters(), 1.0)
        opt.step()
        if it % 10 == 0:
            bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()})
    return mtn.eval()


def labelled(mtn, dataset, cfg, batch_size, device):
    """Each trajectory's reuse error at each probe, the base pair's motion, and Eq. 12's t* (as a probe index)."""
    parts = [{k: v[i:i + batch_size].to(device).float() for k, v in dataset.items()}
             for i in range(0, len(dataset["z"]), batch_size)]
    errors = torch.cat([reuse_errors(mtn, part) for part in parts])
    with torch.no_grad():
        motion = torch.cat([pair_logits(mtn, part["base_feats"])[:, :, 0] for part in parts])
    return errors, motion, transition_labels(errors, cfg)


def train_step_selector(motion, labels, cfg, args, gen, device):
    """The step selector, trained to predict t* from the motion seen so far: later probes are hidden (Sec. IV-C)."""
    dss = StepSelector(cfg).to(device)
    opt = torch.optim.AdamW(dss.parameters(), lr=args.lr)
    P = len(cfg.probes)
    for _ in tqdm(range(args.dss_iters), desc="step selector"):
        idx = torch.randint(0, len(labels), (min(args.batch_size * 4, len(labels)),), generator=gen)
        seen = torch.randint(2, P + 1, (len(idx),), generator=gen).to(device)
        loss = F.cross_entropy(dss(motion[idx], seen), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return dss.eval()


def train(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    ckpt_path = args.ckpt or pipeline.newest_checkpoint(args.run)
    model, vae, ckpt = pipeline.load(ckpt_path)
    model = model.to(device)
    f, latent_size = ckpt["latent_frames"], ckpt["args"]["size"] // vae.spatial_compression
    p = model.cfg.patch_size
    h = latent_size // p
    cfg = ReuseConfig(blocks=args.blocks or default_blocks(model.cfg.depth), width=model.cfg.width, grid=(h, h),
                      patch_size=p, probes=probe_steps(args), base_frames=args.base_frames, radius=args.radius,
                      beta=args.beta)
    if max(cfg.blocks) >= model.cfg.depth:
        raise ValueError(f"--blocks {' '.join(map(str, cfg.blocks))}: MedSora-{ckpt['args']['model']} has blocks "
                         f"0..{model.cfg.depth - 1}")
    if f <= cfg.base_frames:
        raise ValueError(f"{ckpt_path} makes {f} latent frames, no more than --base-frames {cfg.base_frames}: "
                         f"nothing would be reused")
    out = args.out or os.path.join(os.path.dirname(ckpt_path), "reuse", "reuse.pt")
    if os.path.isdir(out) or out.endswith(os.sep):  # a folder: the file goes into it
        out = os.path.join(out, "reuse.pt")
    if os.path.dirname(os.path.abspath(out)) == os.path.dirname(os.path.abspath(ckpt_path)):
        raise ValueError(f"--out {out}: not beside the checkpoint, where sample.py would take it for the newest "
                         f"MedSora checkpoint; the default is {os.path.join(os.path.dirname(ckpt_path), 'reuse')}/")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    t0 = time.perf_counter()
    print(f"denoising reuse for {ckpt_path} (step {ckpt['step']}): {f} latent frames, base frames "
          f"0..{cfg.base_frames - 1}, blocks {cfg.blocks}, probes {cfg.probes}, DDIM {args.steps} steps")
    train_set = trajectories(model, f, latent_size, args.videos, 0, args.steps, cfg, device, amp, args.batch_size,
                             args.seed, "trajectories")
    val_set = trajectories(model, f, latent_size, args.val_videos, args.videos, args.steps, cfg, device, amp,
                           args.batch_size, args.seed, "validation trajectories")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    mtn = train_motion_net(train_set, cfg, args, gen, device)  # 1. the motion network, Eq. 11
    # 2. Eq. 12's t* of every trajectory, and the step selector that predicts it from the base pair's motion
    train_err, train_motion, train_labels = labelled(mtn, train_set, cfg, args.batch_size, device)
    val_err, val_motion, val_labels = labelled(mtn, val_set, cfg, args.batch_size, device)
    dss = train_step_selector(train_motion, train_labels, cfg, args, gen, device)
    with torch.no_grad():
        chosen, seen = decide(dss, val_motion)

    # what the networks achieve on the validation trajectories
    P = len(cfg.probes)
    probes_t = torch.tensor(cfg.probes)
    labels = val_labels.cpu()
    summary = {"reuse_error_by_probe": dict(zip(map(int, cfg.probes[1:]), val_err[:, 1:].mean(0).tolist())),
               "labels": torch.bincount(labels, minlength=P).tolist(),
               "selector_accuracy": float((chosen == labels).float().mean()),
               "selector_mean_abs_step_error": float((probes_t[chosen] - probes_t[labels]).abs().float().mean()),
               "selector_probes_seen": float(seen.float().mean()), "minutes": (time.perf_counter() - t0) / 60}
    print("t*      reuse error (L1, validation)   log(beta t) x error")
    for t, e in summary["reuse_error_by_probe"].items():
        print(f"{t:4d}    {e:.4f}                          {math.log(cfg.beta * t) * e:.4f}")
    print(f"Eq. 12's t* of the validation videos, by probe {cfg.probes}: {summary['labels']}")
    print(f"the selector, deciding as the probes arrive (after {summary['selector_probes_seen']:.1f} of {P} on "
          f"average), picks that t* for {100 * summary['selector_accuracy']:.0f} % of them, "
          f"{summary['selector_mean_abs_step_error']:.0f} steps off on average")
    checkpoint.save({"mtn": mtn.state_dict(), "dss": dss.state_dict(), "config": asdict(cfg),
                     "ckpt": os.path.abspath(ckpt_path), "ckpt_step": ckpt["step"], "steps": args.steps,
                     "summary": summary}, out)
    print(f"wrote {out} in {summary['minutes']:.1f} min; sample with: python sample.py --ckpt {ckpt_path} "
          f"--reuse {out}")
    return out


def probe_steps(args):
    """The probes: --probes steps from 999 down to --lowest-probe."""
    return tuple(int(t) for t in np.round(np.linspace(999, args.lowest_probe, args.probes)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the motion network and the step selector on a MedSora checkpoint")
    t.add_argument("--run", default="runs/medsora", help="run folder: its newest checkpoint is used")
    t.add_argument("--ckpt", default=None, help="a checkpoint file instead")
    t.add_argument("--out", default=None, help="default: reuse/reuse.pt beside the checkpoint")
    t.add_argument("--videos", type=int, default=256, help="trajectories to train on")
    t.add_argument("--val-videos", type=int, default=32)
    t.add_argument("--steps", type=int, default=50, help="DDIM steps of the trajectories")
    t.add_argument("--probes", type=int, default=10, help="P: steps where motion is measured, the t* candidates")
    t.add_argument("--lowest-probe", type=int, default=99, help="the probes run from 999 down to this step")
    t.add_argument("--base-frames", type=int, default=2)
    t.add_argument("--blocks", type=int, nargs="+", default=None, help="MedSora blocks whose features give the "
                   "motion (default: the middle one and the last)")
    t.add_argument("--radius", type=int, default=-1, help="offsets searched, in tokens; -1: the whole grid")
    t.add_argument("--beta", type=float, default=1.0, help="Eq. 12's beta")
    t.add_argument("--iters", type=int, default=2000)
    t.add_argument("--dss-iters", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # checked before the model loads; each failure is one line, exit status 2
    distributed.check_args(p, args, positive=("videos", "val_videos", "steps", "probes", "lowest_probe", "iters",
                                              "dss_iters", "batch_size", "lr", "beta"),
                           non_negative=("blocks", "seed"), folder=None)
    if not args.lowest_probe < 999 or args.steps > 1000:
        p.error(f"--lowest-probe {args.lowest_probe} must be under 999, and --steps {args.steps} at most 1000")
    if args.probes < 2 or args.base_frames < 2 or not (args.radius == -1 or args.radius >= 1):
        p.error(f"--probes {args.probes}, --base-frames {args.base_frames}, --radius {args.radius}: at least 2 probes "
                f"(T and one t*), 2 base frames (a pair has motion), and a radius of -1 (the whole grid) or 1 or more")
    try:
        probe_grid(probe_steps(args), Diffusion().timesteps(args.steps))
    except ValueError as e:
        p.error(f"--steps {args.steps}: {e}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("reuse.py train runs in one process: start it with python, not torchrun")
    return train(args)


if __name__ == "__main__":
    distributed.cli(main)
