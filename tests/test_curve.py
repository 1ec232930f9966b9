"""curve.py: the reconstruction floor decodes the right latents; segments, resume, budget and the recipe curves."""

import dataclasses
import glob
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import curve, runs
import data
import vae as vae_lib


def test_reconstructions_are_the_vae_round_trip(tmp_path):
    # a scaling factor far from 1: decoding the posterior mean as if it were scaled would shrink it by 0.25
    cfg = dataclasses.replace(vae_lib.MODELS["tiny"], scaling_factor=0.25)
    torch.manual_seed(0)
    model = vae_lib.VideoVAE(cfg).eval()
    path = str(tmp_path / "vae.pt")
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)}, path)
    curve.write_reconstructions(path, str(tmp_path / "recon"), 3, 32, 8, torch.device("cpu"), batch_size=2,
                                workers=0)

    assert curve.reconstructions_in(str(tmp_path / "recon")) == 3  # a later --clips 4 writes them again
    assert curve.reconstructions_in(str(tmp_path / "none")) == 0
    folders = sorted(glob.glob(str(tmp_path / "recon" / "frames" / "*")))
    assert [os.path.basename(f) for f in folders] == ["000000", "000001", "000002"]
    clips = data.make_dataset("synthetic", "train", num_frames=8, size=32, num_images=0, flip=False,
                              with_flow=False)
    for i, folder in enumerate(folders):
        x = clips[i]["video"].transpose(0, 1)[None]  # (1, 3, F, H, W)
        with torch.no_grad():
            want = model.decode(model.encode_moments(x)[0], scaled=False)[0].clamp(-1, 1)
        want = ((want.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round()
        got = np.stack([np.asarray(Image.open(f)) for f in sorted(glob.glob(os.path.join(folder, "*.png")))])
        assert got.shape == want.shape == (9, 32, 32, 3)
        assert np.abs(got - want).max() <= 1


def fake_scripts(monkeypatch, started, threads=None, failing=None):
    """curve.start and curve.evaluate without running anything: train.py writes a checkpoint and a log line,
    sample.py a frame folder, evaluate.py a result that falls with the checkpoint's minutes. `threads` gets
    each script's OMP_NUM_THREADS; this process's own thread count is left alone. The train.py of recipe
    `failing` exits with status 1 and writes nothing."""
    threads = [] if threads is None else threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored after the test
    monkeypatch.setattr(curve.torch, "set_num_threads", lambda n: None)
    class Done:
        code = 0

        def wait(self):
            return self.code

        def poll(self):
            return self.code

    def popen(args, stdout, stderr):  # curve.start's own log handling runs: its folder must be made
        assert not stdout.closed and args[0] == sys.executable and os.path.dirname(args[1]) == runs.ROOT
        cmd = [os.path.basename(args[1]), *args[2:]]  # scripts run by their path under the project root
        started.append(cmd)
        threads.append(os.environ.get("OMP_NUM_THREADS"))
        out = cmd[cmd.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        if cmd[0] == "train.py" and failing and os.path.join(failing, "medsora") in out:
            failed = Done()
            failed.code = 1
            return failed
        if cmd[0] == "train_vae.py":
            open(os.path.join(out, "ckpt.pt"), "w").close()
        elif cmd[0] == "train.py":
            minutes = float(cmd[cmd.index("--max-minutes") + 1])
            total = minutes + (json.load(open(os.path.join(out, "ckpt.pt")))["minutes"] if "--resume" in cmd else 0)
            json.dump({"minutes": total}, open(os.path.join(out, "ckpt.pt"), "w"))
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps({"step": int(100 * total), "loss": 0.1, "clips_per_s": 50.0}) + "\n")
            cache = cmd[cmd.index("--cache-dir") + 1]
            os.makedirs(cache, exist_ok=True)
            open(os.path.join(cache, "meta.json"), "w").close()
        elif cmd[0] == "sample.py":
            for v in range(int(cmd[cmd.index("--num-videos") + 1])):
                os.makedirs(os.path.join(out, "frames", f"{v:06d}"), exist_ok=True)
                for k in range(4):  # four 8 x 8 frames
                    Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(os.path.join(out, "frames", f"{v:06d}",
                                                                            f"{k:03d}.png"))
            with open(os.path.join(out, "ckpt_used"), "w") as f:
                f.write(open(cmd[cmd.index("--ckpt") + 1]).read())
            clip = float(cmd[cmd.index("--clip-x0") + 1]) if "--clip-x0" in cmd else None
            json.dump({"latents": {"absmax": clip or 9.0}, "outliers": 0.001, "saturated": 0.002},
                      open(os.path.join(out, "stats.json"), "w"))
        return Done()

    def evaluate(fake, out, args, fake_stride=1, fake_split="all", recon=None):
        floor = {"synthetic": 100.0}.get(fake, 1000.0)
        if os.path.exists(os.path.join(fake, "ckpt_used")):
            floor = 5000.0 / json.load(open(os.path.join(fake, "ckpt_used")))["minutes"]
        result = {"metrics": {"FVD": floor, "FID": floor / 10}}
        if recon:  # against the reconstructions: the VAE's part taken away
            assert recon == os.path.join(args.out, "vae", "ckpt.pt")
            result["vs_recon"] = {"FVD": floor / 2, "FID": floor / 20}
        json.dump(result, open(out, "w"))

    monkeypatch.setattr(runs.subprocess, "Popen", popen)
    monkeypatch.setattr(curve, "evaluate", evaluate)
    monkeypatch.setattr(curve, "write_reconstructions", lambda *a, **k: None)


def test_segments_resume_and_recipes(tmp_path, monkeypatch):
    started, threads = [], []
    fake_scripts(monkeypatch, started, threads)
    monkeypatch.setattr(curve.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(curve.os, "cpu_count", lambda: 16)
    out = str(tmp_path / "curve")
    curve.main(["--out", out, "--recipes", "short", "paper", "--points", "1", "3", "--clips", "2", "--clip-x0", "4",
                "--train-flags", "--max-clips 64", "--eval-jobs", "3"])
    assert started[0][0] == "train_vae.py" and threads[0] is None  # alone: every core
    assert threads[1:] == ["3"] * (len(started) - 1)  # 16 cores shared by 2 trainers and 3 evaluations

    trains = [c for c in started if c[0] == "train.py"]
    assert all(c[c.index("--max-clips") + 1] == "64" for c in trains)
    assert len(trains) == 4  # two segments, two recipes each
    assert ["--resume" in c for c in trains] == [False, False, True, True]
    assert [c[c.index("--max-minutes") + 1] for c in trains] == ["1.0", "1.0", "2.0", "2.0"]
    short = next(c for c in trains if "--lr" in c)
    assert short[short.index("--lr") + 1:short.index("--lr") + 3] == ["1e-3", "1e-3"]
    assert not any("--lr" in c for c in trains if os.path.join("paper", "") in c[c.index("--out") + 1])
    assert {c[c.index("--cache-dir") + 1] for c in trains} == {os.path.join(out, "latents")}  # one shared cache
    samples = [c for c in started if c[0] == "sample.py"]
    clipped = [c for c in samples if "--clip-x0" in c]
    assert len(samples) == 5 and len(clipped) == 1 and clipped[0][-2:] == ["--clip-x0", "4.0"]
    assert clipped[0][clipped[0].index("--ckpt") + 1] == os.path.join(out, "short", "ckpts", "min3.pt")

    got = json.load(open(os.path.join(out, "curve.json")))
    assert set(got["recipes"]) == {"short", "paper"}
    for recipe in ("short", "paper"):
        points = got["recipes"][recipe]["points"]
        assert [p["minutes"] for p in points] == [1, 3]
        assert [p["steps"] for p in points] == [100, 300]
        assert [round(p["fvd"]) for p in points] == [5000, 1667]  # each point sampled its own checkpoint
        assert [round(p["fvd_recon"]) for p in points] == [2500, 833]  # and scored against the reconstructions
        assert [(p["max_abs_z"], p["outliers_pct"], p["saturated_pct"], p["bright_pct"]) for p in points] == [(9.0, 0.1, 0.2, None)] * 2
    assert got["clipped"]["recipe"] == "short" and got["clipped"]["minutes"] == 3
    assert round(got["clipped"]["fvd"]) == 1667 and got["clipped"]["max_abs_z"] == 4.0
    assert got["floors"]["train vs val"]["fvd"] == 100.0
    assert got["floors"]["reconstruction vs val"]["fvd"] == 1000.0
    assert Image.open(os.path.join(out, "curve.png")).size == (720, 400)
    assert Image.open(os.path.join(out, "losses.png")).size == (720, 360)
    picture = Image.open(os.path.join(out, "short", "generated", "min3.png"))  # every other frame, 2 videos
    assert picture.size == (16, 16) and picture.getpixel((8, 0)) == (80, 0, 0)

    # everything is there: a second call runs nothing
    started.clear()
    curve.main(["--out", out, "--recipes", "short", "paper", "--points", "1", "3", "--clips", "2", "--clip-x0", "4"])
    assert started == []


def test_budget_stops_before_a_segment_that_would_overrun(tmp_path, monkeypatch):
    started = []
    fake_scripts(monkeypatch, started)
    out = str(tmp_path / "curve")
    curve.main(["--out", out, "--points", "1", "5", "--clips", "2", "--budget-minutes", "3", "--clip-x0", "4"])
    trains = [c for c in started if c[0] == "train.py"]
    assert len(trains) == 1
    assert not any("--clip-x0" in c for c in started)  # the last point is not there yet
    got = json.load(open(os.path.join(out, "curve.json")))
    assert [p["minutes"] for p in got["recipes"]["short"]["points"]] == [1]
    # a later call with more budget continues from the first checkpoint
    started.clear()
    curve.main(["--out", out, "--points", "1", "5", "--clips", "2"])
    trains = [c for c in started if c[0] == "train.py"]
    assert len(trains) == 1 and "--resume" in trains[0] and trains[0][trains[0].index("--max-minutes") + 1] == "4.0"


def test_an_align_recipe_has_its_own_cache_and_the_feature_weights(tmp_path, monkeypatch):
    started = []
    fake_scripts(monkeypatch, started)
    out = str(tmp_path / "curve")
    curve.main(["--out", out, "--recipes", "short", "short-align", "--points", "1", "--clips", "2",
                "--inception", "/weights/default_1.pt"])
    plain, aligned = [c for c in started if c[0] == "train.py"]
    assert "--align" not in plain and "--inception" not in plain
    assert plain[plain.index("--cache-dir") + 1] == os.path.join(out, "latents")
    assert "--align" in aligned and aligned[aligned.index("--inception") + 1] == "/weights/default_1.pt"
    assert aligned.count("--cache-dir") == 1 and aligned[aligned.index("--cache-dir") + 1] == os.path.join(out, "latents_align")


def test_a_failing_recipe_is_named_and_the_others_go_on(tmp_path, monkeypatch):
    started = []
    fake_scripts(monkeypatch, started, failing="short-align")
    out = str(tmp_path / "curve")
    with pytest.raises(SystemExit, match=r"short-align: train.py failed with exit status 1; see .*train.log"):
        curve.main(["--out", out, "--recipes", "short", "short-align", "--points", "1", "2", "--clips", "2"])
    trains = [c for c in started if c[0] == "train.py"]
    assert len(trains) == 3  # short at both points; short-align once, then no more
    got = json.load(open(os.path.join(out, "curve.json")))
    assert [p["minutes"] for p in got["recipes"]["short"]["points"]] == [1, 2]
    assert got["recipes"]["short-align"]["points"] == []


def test_loss_plot_marks_a_run_that_ended_non_finite(tmp_path):
    ok = [{"step": s, "loss": 0.5 / s} for s in range(10, 510, 10)]
    cross = lambda path: sum(1 for p in Image.open(path).convert("RGB").getdata() if p == (255, 0, 255))  # noqa: E731
    curve.plot_losses({"a": ok, "b": ok[:30]}, str(tmp_path / "fine.png"))
    assert cross(tmp_path / "fine.png") == 0
    diverged = ok[:30] + [{"step": 310, "loss": 9.0}, {"step": 314, "error": "non-finite", "skipped": 5}]
    curve.plot_losses({"a": ok, "b": diverged}, str(tmp_path / "diverged.png"))
    assert cross(tmp_path / "diverged.png") > 20  # the cross at b's end


def test_evaluated_reads_evaluate_py_names(tmp_path):
    path = str(tmp_path / "eval.json")
    json.dump({"metrics": {"FVD": 10.0, "FID": 2.0, "FC-Inception": 92.5, "CD-FVD": 7.0, "FC (CLIP)": 95.0,
                           "IS": None}}, open(path, "w"))
    got = runs.evaluated(path, ["fvd", "fc_inception", "cdfvd", "fc"])
    assert got == {"fvd": 10.0, "fid": 2.0, "fc_inception": 92.5, "cdfvd": 7.0, "fc": 95.0, "is": None}
    assert runs.evaluated(path, ["fvd", "is"]) is None  # a metric without a value: evaluate again


def test_evaluations_wait_for_the_training_when_asked(tmp_path, monkeypatch):
    started = []
    fake_scripts(monkeypatch, started)
    out = str(tmp_path / "curve")
    curve.main(["--out", out, "--recipes", "short", "short-b2", "--points", "1", "2", "3", "--clips", "2",
                "--eval-jobs", "3", "--eval-after-training"])
    kinds = [c[0] for c in started]
    last_train = max(i for i, k in enumerate(kinds) if k == "train.py")
    assert kinds.count("train.py") == 6 and kinds.count("sample.py") == 6
    assert "sample.py" not in kinds[:last_train]  # no checkpoint is sampled while any recipe trains
    b2 = [c for c in started if c[0] == "train.py" and os.path.join("short-b2", "") in c[c.index("--out") + 1]]
    assert all(c[c.index("--betas") + 1:c.index("--betas") + 3] == ["0.9", "0.95"] for c in b2)
    got = json.load(open(os.path.join(out, "curve.json")))
    assert [p["minutes"] for p in got["recipes"]["short-b2"]["points"]] == [1, 2, 3]
    assert got["recipes"]["short"]["stability"]["steps"] == 300


def test_stability_counts_spikes_and_a_non_finite_stop():
    steady = [{"step": 10 * i, "loss": 0.05 + 0.01 * (i % 3), "grad_norm": 0.08} for i in range(1, 60)]
    got = curve.stability(steady)
    assert got == {"steps": 590, "spikes": 0, "spike_steps": [], "worst_spike": None, "max_grad_norm": 0.08,
                   "non_finite_stop": False}
    spiky = [dict(r) for r in steady]
    spiky[40].update(loss=0.3, grad_norm=0.5)  # 0.3 against a median of 0.06: a spike of 5x
    spiky[41].update(loss=0.11)  # under 2x the median: not one
    diverged = spiky + [{"step": 600, "loss": None, "grad_norm": float("nan")},
                        {"step": 604, "error": "non-finite", "skipped": 5}]
    got = curve.stability(diverged)
    assert got["spikes"] == 1 and got["spike_steps"] == [410] and got["worst_spike"] == pytest.approx(5.0)
    assert got["max_grad_norm"] == 0.5 and got["non_finite_stop"] and got["steps"] == 590
