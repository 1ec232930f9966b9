"""
Local (sliding-window) attention over the tokens of one frame: the local branch of MedSora's spatial
component (paper Sec. 3.1, Eq. 6-7, Table 1: window 8, look backward 1, look forward 1, dropout 0.1,
exact window size True).

Which keys a query may see (tokens in raster order, positions 0..L-1):
  - the sequence is cut into windows of `window_size` tokens; a query in window i sees the keys of windows
    i - look_backward ... i + look_forward;
  - with `exact_windowsize`, additionally only keys k with q - window*look_backward <= k <= q + window*look_forward,
    so every query sees the same span around itself, wherever it sits in its window.
These are the Table 1 settings' semantics (as in the widely used `local-attention` package); the paper's
Eq. 6 states the window as +-w/2, which Table 1's look-backward / look-forward settings generalise.

Fast path: `scaled_dot_product_attention` with a cached boolean band mask. Reference: a per-query masked
softmax that evaluates the rule above directly (`local_attention_reference`); tests compare the two.

Dimension names: N sequences (batch * frames), L tokens, D width, nh heads, hd head dim.
"""

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F


def may_attend(q, k, L, window_size, look_backward, look_forward, exact_windowsize):
    """The rule, for one (query, key) pair of positions: the reference's definition of the window."""
    if not 0 <= k < L:
        return False
    wq, wk = q // window_size, k // window_size
    if not wq - look_backward <= wk <= wq + look_forward:
        return False
    return not exact_windowsize or q - window_size * look_backward <= k <= q + window_size * look_forward


@lru_cache(maxsize=64)
def band_mask(L, window_size, look_backward, look_forward, exact_windowsize, device):
    """(L, L) boolean mask, True where query row may attend key column; built with tensor ops."""
    pos = torch.arange(L, device=device)
    q, k = pos[:, None], pos[None, :]
    wq, wk = q // window_size, k // window_size
    mask = (wk >= wq - look_backward) & (wk <= wq + look_forward)
    if exact_windowsize:
        mask &= (k >= q - window_size * look_backward) & (k <= q + window_size * look_forward)
    return mask


def local_attention_reference(q, k, v, window_size, look_backward, look_forward, exact_windowsize,
                              dropout=0.0, training=False):
    """Eq. 7 one query at a time: softmax over the allowed keys only. q, k, v (N, nh, L, hd)."""
    L, hd = q.shape[-2], q.shape[-1]
    out = torch.empty_like(q)
    for i in range(L):
        keys = [j for j in range(L) if may_attend(i, j, L, window_size, look_backward, look_forward,
                                                    exact_windowsize)]
        scores = q[..., i:i + 1, :] @ k[..., keys, :].transpose(-1, -2) / hd ** 0.5  # (N, nh, 1, |S(i)|)
        weights = F.dropout(scores.softmax(dim=-1), dropout, training)
        out[..., i:i + 1, :] = weights @ v[..., keys, :]
    return out


class LocalAttention(nn.Module):
    """Multi-head local attention. q, k, v projections without bias and without an output projection:

    Table 1's parameter counts include no W_o (the adaLN-Zero gate that follows scales each channel anyway),
    so Eq. 7's W_o is left out to keep the paper's model sizes.
    """

    def __init__(self, dim, num_heads=8, window_size=8, look_backward=1, look_forward=1, exact_windowsize=True,
                 dropout=0.1, impl="sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        if impl not in ("sdpa", "reference"):
            raise ValueError(f"unknown attention impl {impl!r}; expected 'sdpa' or 'reference'")
        self.num_heads, self.dropout, self.impl = num_heads, dropout, impl
        self.window = (window_size, look_backward, look_forward, exact_windowsize)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x, mask=None):
        """x (N, L, D) -> (N, L, D). mask: band_mask(L, ...) of this layer's window, built here when None."""
        N, L, D = x.shape
        q, k, v = self.qkv(x).view(N, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.impl == "reference":
            out = local_attention_reference(q, k, v, *self.window, self.dropout, self.training)
        else:
            mask = band_mask(L, *self.window, x.device) if mask is None else mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(N, L, D)  # (N, L, nh * hd)
