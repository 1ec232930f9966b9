"""ssm.py: the three scans agree (forward and gradients), the layer composes orders correctly, spirals are spirals."""
import pytest
import torch
import torch.nn.functional as F

import ssm

TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


def random_scan_inputs(b, L, nh, hd, N, G, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    x, B, C = r(b, L, nh, hd), r(b, L, G, N), r(b, L, G, N)
    dt = F.softplus(r(b, L, nh) - 1)  # positive step sizes, some large enough to decay fast
    A = -torch.rand(nh, generator=g, dtype=dtype) * 8 - 0.5
    D = r(nh)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


def rel_err(a, b):
    """|a - b| / |b|; a zero b (the gradient of A at L = 1) asks for a zero a."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("L,chunk", [(1, 16), (16, 16), (48, 16), (50, 16), (100, 32), (37, 256)])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_matches_recurrence(dtype, L, chunk, groups):
    inputs = random_scan_inputs(2, L, 4, 8, 16, groups, dtype, seed=L)
    ref = ssm.ssd_recurrent(*inputs)
    out = ssm.ssd_chunked(*inputs, chunk_size=chunk)
    grad_out = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, inputs, grad_out)
    # at L = 1 the chunked path is pointwise and A, which only decays the (zero) initial state, is unused
    g_out = [torch.zeros_like(x) if g is None else g
             for g, x in zip(torch.autograd.grad(out, inputs, grad_out, allow_unused=True), inputs)]
    errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(g_out, g_ref)]
    print(f"L={L} chunk={chunk} G={groups} {dtype}: rel err fwd {errs[0]:.1e}, grads max {max(errs[1:]):.1e}")
    assert all(e < TOL[dtype] for e in errs), errs  # (max() would hide a NaN)


def test_recurrence_matches_hand_computation():
    """Two steps of Eq. 3 written out by hand, one head, state size 1."""
    x = torch.tensor([[[[2.0]], [[3.0]]]])  # (1, 2, 1, 1)
    dt, A, D = torch.tensor([[[0.5], [0.25]]]), torch.tensor([-2.0]), torch.tensor([0.1])
    B, C = torch.tensor([[[[1.5]], [[-1.0]]]]), torch.tensor([[[[2.0]], [[4.0]]]])
    h1 = 0.5 * 2.0 * 1.5
    h2 = torch.exp(torch.tensor(0.25 * -2.0)) * h1 + 0.25 * 3.0 * -1.0
    expected = torch.tensor([h1 * 2.0 + 0.1 * 2.0, h2 * 4.0 + 0.1 * 3.0])
    assert torch.allclose(ssm.ssd_recurrent(x, dt, A, B, C, D).flatten(), expected)


def small_layer(scan="chunked", seed=0):
    torch.manual_seed(seed)
    return ssm.Mamba2(32, d_state=16, headdim=8, chunk_size=16, scan=scan).double()


def test_layer_paths_agree_forward_and_backward():
    layers = {s: small_layer(s) for s in ("chunked", "recurrent")}
    u = torch.randn(3, 37, 32, dtype=torch.float64)
    outs, grads = {}, {}
    for s, layer in layers.items():
        out = layer(u, ssm.bidirectional(37))
        out.square().sum().backward()
        outs[s], grads[s] = out, {n: p.grad for n, p in layer.named_parameters()}
    assert rel_err(outs["chunked"], outs["recurrent"]) < 1e-10
    for n in grads["chunked"]:
        assert rel_err(grads["chunked"][n], grads["recurrent"][n]) < 1e-9, n


def test_orders_are_scanned_in_order_and_summed_in_place():
    """forward(u, orders) equals scanning each permuted copy, un-permuting and summing, done by hand."""
    layer = small_layer()
    u = torch.randn(2, 20, 32, dtype=torch.float64)
    orders = ssm.spiral(4, 5, variant=3)
    by_hand = 0
    for o in orders:
        y = layer.mix(layer.in_proj(u[:, o]))  # scan the permuted sequence
        by_hand = by_hand + y[:, ssm.inverse(o)]
    assert torch.allclose(layer(u, orders), layer.out_proj(by_hand), atol=1e-12)
    # and a reverse scan really is different from a forward one (the layer is causal)
    assert not torch.allclose(layer(u), layer(u.flip(1)).flip(1))


def test_layer_is_causal_in_scan_order():
    layer = small_layer()
    u = torch.randn(1, 30, 32, dtype=torch.float64)
    v = u.clone()
    v[:, 20] += 1.0
    diff = (layer(u) - layer(v)).abs().amax(dim=(0, 2))
    assert diff[:20].max() == 0 and diff[20:].min() > 0


def test_state_dict_matches_mamba_ssm_layout():
    """Names and shapes of mamba_ssm.Mamba2(512) with the paper's settings (Table 1), as that class defines them."""
    shapes = {n: tuple(p.shape) for n, p in ssm.Mamba2(512).state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * 1024 + 2 * 128 + 16, 512), "conv1d.weight": (1024 + 256, 1, 4),
        "conv1d.bias": (1280,), "dt_bias": (16,), "A_log": (16,), "D": (16,), "norm.weight": (1024,),
        "out_proj.weight": (512, 1024)}
    layer = ssm.Mamba2(512)
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6  # dt init range of Table 1
    A = layer.A_log.exp()
    assert A.min() >= 1 and A.max() <= 16


def test_unknown_scan_is_an_error():
    with pytest.raises(ValueError, match="unknown scan"):
        ssm.Mamba2(32, scan="fast")
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        ssm.ssd_scan(*[t.detach() for t in random_scan_inputs(1, 4, 2, 4, 4, 1, torch.float32)], scan="kernel")


SHAPES = [(1, 1), (1, 6), (6, 1), (2, 2), (2, 3), (4, 8), (6, 8), (8, 8), (3, 7), (7, 3)]


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("variant", range(len(ssm.SPIRALS)))
def test_spiral_is_a_spiral(rows, cols, variant):
    order, rev = ssm.spiral(rows, cols, variant)
    assert sorted(order.tolist()) == list(range(rows * cols))  # a permutation
    assert torch.equal(rev, order.flip(0))
    r, c = order // cols, order % cols
    steps = (r.diff().abs() + c.diff().abs())
    assert (steps == 1).all(), "every step must move to a 4-neighbour"
    corner, _ = ssm.SPIRALS[variant]
    assert (r[0].item(), c[0].item()) == (0 if "top" in corner else rows - 1, 0 if "left" in corner else cols - 1)
    # spiral, not snake: the whole outer ring comes first
    ring = 2 * (rows + cols) - 4 if rows > 1 and cols > 1 else rows * cols
    on_border = (r == 0) | (r == rows - 1) | (c == 0) | (c == cols - 1)
    assert on_border[:ring].all() and not on_border[ring:].any()


def test_spiral_variants_are_distinct_and_round_trip():
    orders = [ssm.spiral(4, 8, v)[0] for v in range(len(ssm.SPIRALS))]
    assert len({tuple(o.tolist()) for o in orders}) == 8
    x = torch.randn(3, 32, 5)
    for o in orders + [ssm.bidirectional(32)[1]]:
        inv = ssm.inverse(o)
        assert torch.equal(x[:, o][:, inv], x) and torch.equal(o[inv], torch.arange(32))


def test_causal_conv_matches_nn_conv1d():
    conv = torch.nn.Conv1d(12, 12, 4, groups=12, padding=3).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    expected = conv(x.transpose(1, 2))[..., :9].transpose(1, 2)  # pad both sides, keep the causal part
    assert torch.allclose(ssm.causal_depthwise_conv(x, conv.weight, conv.bias), expected, atol=1e-12)


def test_one_step_sequences_take_the_pointwise_path():
    """An image as a one-frame clip: both temporal orders are the identity, and the layer is pointwise."""
    layer = small_layer()
    u = torch.randn(6, 1, 32, dtype=torch.float64)
    zxbcdt = layer.in_proj(u)
    by_hand = 2 * layer.mix(zxbcdt)  # two identical scans, summed
    assert torch.allclose(layer(u, ssm.bidirectional(1)), layer.out_proj(by_hand), atol=1e-12)
    recurrent = small_layer("recurrent")
    assert torch.allclose(layer(u, ssm.bidirectional(1)), recurrent(u, ssm.bidirectional(1)), atol=1e-12)
    v = torch.randn(6, 2, 32, dtype=torch.float64)  # and a second step is not pointwise
    assert not torch.allclose(layer(v)[:, 1], layer(v[:, 1:])[:, 0])
