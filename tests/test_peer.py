"""peer.py: the Latte-style transformer benchmark.py compares MedSora with."""
import torch

import dit
from experiments import peer


def randomised(model):
    """The model with every parameter redrawn, so that no branch starts at zero (adaLN-Zero) and all of them act."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def test_peer_starts_at_zero_and_keeps_images_out_of_the_video():
    cfg = dit.make_config("tiny")
    torch.manual_seed(0)
    x, t = torch.randn(2, 5, 16, 8, 8), torch.tensor([3, 700])
    net = peer.PeerTransformer(cfg)
    assert net(x, t, num_frames=3).abs().max() == 0  # adaLN-Zero: "predict zero" at the start
    net = randomised(net)
    base = net(x, t, num_frames=3)
    assert base.shape == x.shape
    moved = x.clone()
    moved[:, 4] += 1.0  # the second image
    out = net(moved, t, num_frames=3)
    assert torch.allclose(out[:, :4], base[:, :4], rtol=0, atol=1e-6)  # the video and the other image do not see it
    assert (out[:, 4] - base[:, 4]).abs().max() > 1e-3
    moved = x.clone()
    moved[:, 0] += 1.0  # the first video frame
    out = net(moved, t, num_frames=3)
    assert (out[:, 2] - base[:, 2]).abs().max() > 1e-3  # temporal attention carries it along the video
    assert torch.allclose(out[:, 3:], base[:, 3:], rtol=0, atol=1e-6)


def test_sdpa_matches_the_written_out_attention():
    """The fast path (SDPA) against the reference softmax(q k^T / sqrt(hd)) v, forward and gradients."""
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 16, 8, 8), torch.tensor([3, 700])
    outs, grads = [], []
    for impl in ("sdpa", "reference"):
        net = randomised(peer.PeerTransformer(dit.make_config("tiny", attn_impl=impl)))
        xi = x.clone().requires_grad_()
        out = net(xi, t, num_frames=3)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([xi.grad.flatten()] + [p.grad.flatten() for p in net.parameters()]))
    err = (outs[0] - outs[1]).abs().max() / outs[1].abs().max()
    gerr = (grads[0] - grads[1]).norm() / grads[1].norm()
    print("relative error: output", float(err), "gradients", float(gerr))
    assert err < 1e-5 and gerr < 1e-5


def test_one_frame_attention_is_the_value_projection():
    """An image along time is a one-key attention: the shortcut (value projection only) gives what full attention
    over one frame gives, forward and gradients."""
    torch.manual_seed(0)
    block = peer.PeerBlock(32, 4)
    x = torch.randn(6, 1, 32, requires_grad=True)
    fast = block.attend(x, block.qkv_time, block.out_time)
    q, k, v = block.qkv_time(x).chunk(3, dim=-1)
    full = block.out_time(torch.softmax((q * k).sum(-1, keepdim=True), dim=-1) * v)  # softmax over the one key
    assert torch.allclose(fast, full, atol=1e-6) and fast.abs().max() > 1e-2
    g_fast = torch.autograd.grad(fast.square().sum(), x)[0]
    g_full = torch.autograd.grad(full.square().sum(), x)[0]
    assert torch.allclose(g_fast, g_full, atol=1e-6)
