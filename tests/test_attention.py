"""attention.py: the SDPA band-mask path equals the per-query reference for every option combination."""
import itertools

import pytest
import torch

from attention import LocalAttention, band_mask, may_attend

COMBOS = list(itertools.product([2, 4, 8], [0, 1, 2], [0, 1, 2], [True, False]))  # window, back, fwd, exact


def test_window_semantics_by_example():
    # Table 1's settings: window 8, one window back and forward. Query 10 sits in window 1 (tokens 8..15).
    exact = band_mask(64, 8, 1, 1, True, torch.device("cpu"))
    assert exact[10].nonzero().flatten().tolist() == list(range(2, 19))  # 10 - 8 ... 10 + 8
    blocky = band_mask(64, 8, 1, 1, False, torch.device("cpu"))
    assert blocky[10].nonzero().flatten().tolist() == list(range(0, 24))  # windows 0, 1, 2
    assert blocky[0].nonzero().flatten().tolist() == list(range(0, 16))  # no window before the first


@pytest.mark.parametrize("window,back,fwd,exact", COMBOS)
def test_band_mask_equals_rule(window, back, fwd, exact):
    L = 21
    mask = band_mask(L, window, back, fwd, exact, torch.device("cpu"))
    rule = torch.tensor([[may_attend(q, k, L, window, back, fwd, exact) for k in range(L)] for q in range(L)])
    assert torch.equal(mask, rule)


@pytest.mark.parametrize("window,back,fwd,exact", COMBOS)
@pytest.mark.parametrize("L,heads", [(16, 2), (13, 1), (64, 4)])
def test_sdpa_matches_reference(window, back, fwd, exact, L, heads):
    torch.manual_seed(L * 100 + window)
    fast = LocalAttention(32, heads, window, back, fwd, exact, dropout=0.1, impl="sdpa").double().eval()
    ref = LocalAttention(32, heads, window, back, fwd, exact, dropout=0.1, impl="reference").double().eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, L, 32, dtype=torch.float64, requires_grad=True)
    out_fast, out_ref = fast(x), ref(x)
    g = torch.randn_like(out_ref)
    grads_fast = torch.autograd.grad(out_fast, [x, fast.qkv.weight], g)
    grads_ref = torch.autograd.grad(out_ref, [x, ref.qkv.weight], g)
    assert (out_fast - out_ref).abs().max() < 1e-10
    for a, b in zip(grads_fast, grads_ref):
        assert (a - b).abs().max() < 1e-9


def test_window_is_local():
    """Changing a token outside a query's window leaves that query's output unchanged; inside, it does not."""
    attn = LocalAttention(16, 2, window_size=4, look_backward=1, look_forward=1, exact_windowsize=True).eval()
    x = torch.randn(1, 32, 16)
    y = x.clone()
    y[0, 20] += 1.0
    changed = (attn(x) - attn(y)).abs().amax(dim=-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == list(range(16, 25))  # queries 20 - 4 ... 20 + 4


def test_dropout_only_in_training():
    attn = LocalAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 16, 16)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    torch.manual_seed(0)
    a = attn(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, attn(x))
