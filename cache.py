"""
A training-free way to sample faster: reuse a block's output across denoising steps while its input changes little.

This is the feature-caching family (FORA, Delta-DiT, TeaCache), the comparator for reuse.py's denoising reuse.
Between neighbouring DDIM steps most blocks see nearly the same input, so their output change, the residual y - x,
is nearly the same too. Each MedSora block here keeps what it saw when it last ran: its modulated input and its
residual.
  - The input compared is the attention branch's modulated input. It holds the step's adaLN shift and scale, so
    a new t counts as a change too.
  - While that input has moved by less than `threshold` since then (relative L1, per video), the block adds
    the kept residual instead of running.
  - The decision is per video, so a video's result does not depend on the others in its batch.
  - Threshold 0 runs every block: plain sampling, exactly.

    python sample.py --cache-threshold 0.05

Dimension names: B batch, F frames, L tokens per frame, D width.
"""

import torch
import torch.nn as nn

import dit


class CachedBlock(nn.Module):
    """A MedSora block that runs only for the videos whose modulated input has moved by `threshold` or more since
    the block last ran for them; the others get x + the residual it made then."""

    def __init__(self, block, threshold, counts):
        super().__init__()
        self.block, self.threshold, self.counts = block, threshold, counts
        self.seen = self.residual = self.features = None  # per video, from the last time the block ran for it

    def forward(self, x, c, num_frames, h, w, indices=None):
        shift, scale = self.block.adaLN(c)[:, None, None].chunk(9, dim=-1)[:2]
        probe = dit.modulate(self.block.norm1(x), shift, scale)  # (B, F, L, D)
        if self.seen is None or self.seen.shape != probe.shape:
            run = torch.ones(len(x), dtype=torch.bool, device=x.device)
            self.seen, self.residual, self.features = probe.clone(), torch.zeros_like(x), torch.zeros_like(x)
        else:  # relative L1 change of each video's input since its last run
            moved = (probe - self.seen).abs().flatten(1).mean(1) / self.seen.abs().flatten(1).mean(1).clamp_min(1e-12)
            run = moved >= self.threshold
        n = int(run.sum())  # one sync a call: which videos run is decided on the host
        out = x + self.residual
        if n:
            y, s = self.block(x[run], c[run], num_frames, h, w, indices)
            self.seen[run], self.residual[run], self.features[run] = probe[run], (y - x[run]).to(x.dtype), s.to(x.dtype)
            out[run] = y.to(out.dtype)  # the block's own output, not x + (y - x), which rounds differently
        self.counts["run"] += n
        self.counts["reused"] += len(x) - n
        return out, self.features.clone()


class BlockCache:
    """`with BlockCache(model, threshold) as cache:` sample as usual. The blocks are put back on exit, and
    cache.counts says how many (video, block, step) calls ran and how many were reused. Use one per batch."""

    def __init__(self, model, threshold):
        self.model, self.threshold, self.counts = model, threshold, {"run": 0, "reused": 0}

    def __enter__(self):
        self.blocks = self.model.blocks
        self.model.blocks = nn.ModuleList(CachedBlock(b, self.threshold, self.counts) for b in self.blocks)
        return self

    def __exit__(self, *exc):
        self.model.blocks = self.blocks
