"""dit.py: shapes, the paper's parameter counts, image independence, path agreement, overfitting one batch."""
import pytest
import torch
from einops import rearrange

import dit
import ssm
from diffusion import Diffusion


def tiny(**overrides):
    return dit.MedSora(dit.make_config("tiny", in_channels=4, **overrides))


def randomize(model, std=0.2, seed=0):
    """Fresh models are the identity at every block (adaLN-Zero): give every weight a value so tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", "D")):
                continue  # keep the SSM's stable initialisation
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def test_shapes_and_features():
    model = tiny()
    x = torch.randn(2, 7, 4, 8, 12)  # 5 video frames + 2 images, non-square latent
    out, feats = model(x, torch.tensor([0, 999]), num_frames=5, return_features=True)
    assert out.shape == x.shape
    assert len(feats) == model.cfg.depth and feats[0].shape == (2, 7, 4 * 6, model.cfg.width)
    with pytest.raises(ValueError, match="expected latents"):
        model(torch.randn(1, 2, 3, 8, 8), torch.tensor([1]))


@pytest.mark.parametrize("name", ["S", "B", "L"])
def test_parameter_counts_match_paper(name):
    with torch.device("meta"):
        n = dit.count_params(dit.MedSora(dit.make_config(name)))
    paper = dit.PAPER_PARAMS[name]
    print(f"MedSora-{name}: {n:,} parameters, paper {paper / 1e6:.2f}M ({100 * (n - paper) / paper:+.2f}%)")
    assert abs(n - paper) / paper < 0.005


def test_images_never_mix_with_video_or_each_other():
    model = randomize(tiny())
    f, n = 4, 3
    x = torch.randn(2, f + n, 4, 8, 8)
    t = torch.tensor([10, 500])
    base = model(x, t, num_frames=f)

    changed_image = x.clone()
    changed_image[:, f + 1] += torch.randn_like(x[:, f + 1])
    out = model(changed_image, t, num_frames=f)
    diff = (out - base).abs().amax(dim=(0, 2, 3, 4))  # per frame
    print("max change per frame after changing image 1:", diff.tolist())
    assert diff[f + 1] > 1e-3  # the changed image itself changes
    assert diff[:f + 1].max() == 0 and diff[f + 2:].max() == 0  # bit-identical elsewhere

    # the check can fail: a video frame does reach the other video frames, and still no image
    changed_video = x.clone()
    changed_video[:, 0] += torch.randn_like(x[:, 0])
    diff = (model(changed_video, t, num_frames=f) - base).abs().amax(dim=(0, 2, 3, 4))
    assert diff[1:f].min() > 1e-4 and diff[f:].max() == 0


def test_temporal_direction_flag():
    """Bidirectional: the first frame sees the last one through the temporal scan alone."""
    for bidirectional, expect_change in [(True, True), (False, False)]:
        torch.manual_seed(0)
        block = dit.TemporalMamba(dit.make_config("tiny", temporal_bidirectional=bidirectional))
        x = torch.randn(1, 5, 6, block.mamba.in_proj.in_features)
        y = x.clone()
        y[:, -1] += 1
        changed = (block(x) - block(y))[:, 0].abs().max() > 0
        assert bool(changed) == expect_change


def test_reference_paths_agree_with_fast_paths():
    fast = randomize(tiny()).double()
    slow = randomize(tiny(scan="recurrent", attn_impl="reference")).double()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 5, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([3, 700])
    assert (fast(x, t, num_frames=3) - slow(x, t, num_frames=3)).abs().max() < 1e-9


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model, diffusion = tiny(attn_dropout=0.0), Diffusion()
    x0 = torch.randn(2, 4, 4, 8, 8)
    t, noise = torch.tensor([100, 600]), torch.randn_like(x0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss = diffusion.training_loss(model, x0, t, noise, num_frames=3)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"overfit: loss {losses[0]:.3f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.05 * losses[0]


def test_blocks_build_their_own_indices_when_none_are_given():
    model = randomize(tiny(depth=3))
    x, c = torch.randn(2, 5, 4 * 6, model.cfg.width), torch.randn(2, model.cfg.width)  # 3 frames + 2 images
    given = dit.block_indices(model.cfg, 3, 2, 4, 6, x.device)  # non-square: the two planes differ
    for i, block in enumerate(model.blocks):
        out, s = block(x, c, 3, 4, 6, given[i])
        out_, s_ = block(x, c, 3, 4, 6)
        assert torch.equal(out, out_) and torch.equal(s, s_)
    token = lambda frame, row, col: frame * 24 + row * 6 + col  # noqa: E731  (numbering of a sample's tokens)
    for i, entry in enumerate(given):  # what each block is given: its own spiral variant, on each plane
        (w_video, w_images), (h_video, h_images) = entry["spatial"]
        assert w_video.shape == (4, 18) and h_video.shape == (6, 12) and w_images.shape == (8, 6)
        for r in range(4):  # row r of the video: its (3 x 6) grid of (frame, column) along spiral i
            pos = ssm.spiral(3, 6, i)[0]
            assert w_video[r].tolist() == [token(p // 6, r, p % 6) for p in pos.tolist()]
        for col in range(6):  # column col: its (3 x 4) grid of (frame, row)
            pos = ssm.spiral(3, 4, i)[0]
            assert h_video[col].tolist() == [token(p // 4, p % 4, col) for p in pos.tolist()]
        assert sorted(w_images[5].tolist()) == [token(4, 1, col) for col in range(6)]  # image 2, row 1
        for plane in entry["spatial"]:  # every token in exactly one sequence of each plane
            assert sorted(torch.cat([t.flatten() for t in plane]).tolist()) == list(range(5 * 24))
        video_t, image_t = entry["temporal"]
        assert video_t.shape == (24, 3) and video_t[7].tolist() == [7, 31, 55] and image_t.shape == (48, 1)
        assert entry["mask"].shape == (24, 24)
    assert not torch.equal(given[0]["spatial"][0][0], given[1]["spatial"][0][0])  # blocks scan other spirals


def test_spatial_tables_scan_the_planes_of_eq_8():
    """SpatialMamba on its scan tables equals the planes of Eq. 8 cut out of the tensor and scanned by hand along
    the spiral and its reverse (ssm.Mamba2.scan_orders), the video as one clip and each image as its own."""
    torch.manual_seed(0)
    cfg = dit.make_config("tiny", in_channels=4)
    block = dit.SpatialMamba(cfg).double()
    B, f, n, h, w, variant = 2, 3, 2, 4, 6, 5
    x = torch.randn(B, f + n, h * w, cfg.width, dtype=torch.float64)
    got = block(x, dit.spatial_tables(f, n, h, w, variant))

    mamba = block.mamba
    p = rearrange(mamba.in_proj(x), "b f (h w) e -> b f h w e", h=h)
    clips = [(p[:, :f], f), (rearrange(p[:, f:], "b n h w e -> (b n) 1 h w e"), 1)]
    y_w, y_h = [], []
    for clip, frames in clips:
        c = clip.shape[0]
        yw = mamba.scan_orders(rearrange(clip, "c f h w e -> (c h) (f w) e"), ssm.spiral(frames, w, variant))
        yh = mamba.scan_orders(rearrange(clip, "c f h w e -> (c w) (f h) e"), ssm.spiral(frames, h, variant))
        y_w.append(rearrange(yw, "(c h) (f w) e -> c f (h w) e", c=c, h=h, w=w))
        y_h.append(rearrange(yh, "(c w) (f h) e -> c f (h w) e", c=c, h=h, w=w))
    y_w = mamba.out_proj(torch.cat([y_w[0], y_w[1].reshape(B, n, h * w, -1)], dim=1))
    y_h = mamba.out_proj(torch.cat([y_h[0], y_h[1].reshape(B, n, h * w, -1)], dim=1))
    expected = torch.sigmoid(block.gate_w(y_w)) * y_w + torch.sigmoid(block.gate_h(y_h)) * y_h
    assert (got - expected).abs().max() < 1e-12 and expected.abs().max() > 1e-3


def test_compiled_blocks_share_one_graph_and_match_eager():
    """Regional compilation: every block, whatever its spiral, runs the one graph traced for the first."""
    torch._dynamo.reset()
    model = randomize(tiny(depth=4))
    model.train()  # attention dropout off below, so that eager and compiled draw nothing random
    for block in model.blocks:
        block.attn.dropout = 0.0
    x, t = torch.randn(2, 5, 4, 8, 8), torch.tensor([3, 700])
    ref = model(x, t, num_frames=3)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    graphs = []

    def counting(gm, example_inputs):  # a dynamo backend that runs the graph as traced, counting graphs
        graphs.append(gm)
        return gm.forward
    dit.compile_blocks(model, backend=counting)
    out = model(x, t, num_frames=3)
    out.square().mean().backward()
    assert len(graphs) == 1
    assert torch.allclose(out, ref, atol=1e-5) and out.abs().max() > 0.1
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-5), n
    torch._dynamo.reset()


def test_recompute_gives_the_same_gradients_and_saves_far_less():
    """model.recompute (train.py --recompute): the blocks keep only their inputs for the backward pass and run
    again there, with the same attention-dropout masks, so the output and every gradient are the ones without it."""
    torch.manual_seed(0)
    model = dit.MedSora(dit.make_config("tiny")).train()  # attention dropout 0.1 is on
    for p in model.parameters():  # adaLN-Zero starts every branch at zero: give the branches gradients
        p.data += 0.02 * torch.randn_like(p)
    x, t = torch.randn(2, 5, 16, 8, 8), torch.tensor([10, 700])

    def step(recompute):
        model.recompute = recompute
        model.zero_grad()
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out, features = model(x, t, num_frames=3, return_features=True)
        (out.square().mean() + sum(s.square().mean() for s in features)).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved), torch.rand(1)
    out, grads, saved, rng = step(False)
    out_r, grads_r, saved_r, rng_r = step(True)
    assert torch.allclose(out_r, out, rtol=0, atol=1e-6)
    for name in grads:
        assert torch.allclose(grads_r[name], grads[name], rtol=1e-5, atol=1e-7), name
    assert torch.equal(rng_r, rng)  # the random stream goes on as it would without recomputing (exact resume)
    print(f"saved for the backward pass: {saved / 2 ** 20:.2f} MiB, with recompute {saved_r / 2 ** 20:.2f} MiB")
    assert saved_r < 0.25 * saved
