"""tradeoff.py: each sampler setting sampled and timed by sample.py, scored, compared with plain DDIM, and drawn;
a second call finds everything done; bad settings are refused before any work."""

import argparse
import json
import os

import pytest
from PIL import Image

from experiments import runs, tradeoff

REUSE_FLAGS = "--videos 4 --val-videos 2 --steps 20 --iters 3 --dss-iters 3 --batch-size 2 --probes 5"


@pytest.fixture
def ckpt(tiny_run):
    return str(tiny_run / "ckpt.pt")


def test_settings_are_sampled_timed_scored_and_compared(ckpt, tiny_run, tmp_path, monkeypatch, capsys):
    fvd = {"plain": 100.0, "reuse-t500": 105.0, "cache0.2": 130.0}
    fvd_recon = {"plain": 40.0, "reuse-t500": 46.0, "cache0.2": 60.0}  # against the VAE's reconstructions
    evaluated, recons = [], set()

    def fake_evaluate(fake, out, args, recon=None, clips=None):  # evaluate.py's result file, without the I3D
        evaluated.append(os.path.basename(fake))
        recons.add(recon)
        with open(out, "w") as f:
            json.dump({"metrics": {"FVD": fvd[os.path.basename(fake)], "FID": 50.0},
                       "vs_recon": {"FVD": fvd_recon[os.path.basename(fake)], "FID": 20.0},
                       "args": {"num_clips": clips}}, f)
    monkeypatch.setattr(runs, "evaluate", fake_evaluate)
    out = str(tmp_path / "t")
    argv = ["--ckpt", ckpt, "--out", out, "--settings", "plain", "reuse-t500", "cache0.2", "plain", "--clips", "2",
            "--steps", "20", "--batch-size", "2", "--workers", "0", "--reuse-flags", REUSE_FLAGS]  # plain twice: once
    rows = {r["setting"]: r for r in tradeoff.main(argv)}  # reuse.py train and sample.py run for real

    assert os.path.exists(os.path.join(out, "reuse.pt")) and sorted(evaluated) == sorted(fvd)
    assert recons == {str(tiny_run.parent / "vae.pt")}  # the checkpoint's VAE
    for name, r in rows.items():
        assert r["frames"] == 17 and r["videos"] == 2 and r["timed_videos"] == 2 and r["s_per_video"] > 0
        assert abs(r["fvd_change"] - (fvd[name] / 100 - 1)) < 1e-9
        assert abs(r["fvd_recon_change"] - (fvd_recon[name] / 40 - 1)) < 1e-9
        assert len(os.listdir(os.path.join(out, "F17", name, "frames", "000001"))) == 17
        assert os.path.exists(os.path.join(out, "F17", name + ".png"))
    assert rows["plain"]["speedup"] == 1.0 and "frame_steps_ratio" not in rows["plain"]
    # t* 500 -> probe 324 -> DDIM grid step 13 (t 315): 2 base frames for 14 steps, all 5 for 7 (as test_reuse)
    assert rows["reuse-t500"]["t_star_mean"] == 315
    assert rows["reuse-t500"]["frame_steps_ratio"] == (2 * 14 + 5 * 7) / (5 * 20)
    assert 0 <= rows["cache0.2"]["cache_reused"] <= 1
    saved = json.load(open(os.path.join(out, "tradeoff.json")))
    assert [r["setting"] for r in saved["rows"]] == ["plain", "reuse-t500", "cache0.2"]
    assert Image.open(os.path.join(out, "tradeoff.png")).size == (720, 420)
    table = capsys.readouterr().out
    assert "+5.0%" in table and "+15.0%" in table

    # a second call: nothing is trained, sampled or evaluated again, and the table is the same
    started = []
    run = runs.run
    monkeypatch.setattr(runs, "run", lambda cmd, log: started.append(cmd) or run(cmd, log))
    again = tradeoff.main(argv)
    assert started == [] and len(evaluated) == 3
    assert [r["fvd"] for r in again] == [r["fvd"] for r in saved["rows"]]
    # one setting alone: the table still holds every setting measured in OUT, and plain is still the baseline
    alone = tradeoff.main(argv[:5] + ["cache0.2"] + argv[9:])
    assert [r["setting"] for r in alone] == ["cache0.2", "plain", "reuse-t500"]
    assert alone[0]["speedup"] == rows["cache0.2"]["speedup"]
    # more videos: each setting samples the one more, and its score of two videos is not kept
    more = tradeoff.main(argv[:10] + ["3"] + argv[11:])
    assert [c[0] for c in started] == ["sample.py"] * 3 and len(evaluated) == 6
    assert all(r["videos"] == 3 and r["timed_videos"] == 1 for r in more)  # the one batch of this call
    # another length with its own number of videos, plain alone: the table gains its row beside the 17-frame ones
    longer = tradeoff.main(argv[:5] + ["plain", "--num-frames", "8", "--clips", "2"] + argv[11:])
    assert [(r["frames"], r["setting"]) for r in longer] == [(9, "plain"), (17, "plain"), (17, "reuse-t500"),
                                                           (17, "cache0.2")]
    assert longer[0]["speedup"] == 1.0 and longer[0]["videos"] == 2


def test_timing_leaves_out_the_first_batch(tmp_path):
    """Seconds per video are of denoising, over the batches after the first (which also warms the GPU up)."""
    gen = tmp_path / "F17" / "plain"
    gen.mkdir(parents=True)
    speed = {"videos": 6, "seconds": 9.0, "batches": [{"videos": 2, "denoise": 5.0, "decode": 1.0},
                                                      {"videos": 2, "denoise": 1.0, "decode": 0.5},
                                                      {"videos": 2, "denoise": 1.2, "decode": 0.3}]}
    (gen / "speed.json").write_text(json.dumps(speed))
    row = tradeoff.row_of(argparse.Namespace(out=str(tmp_path), metrics="fvd"), 16, "plain")
    assert row["timed_videos"] == 4 and abs(row["s_per_video"] - 2.2 / 4) < 1e-12
    assert row["s_per_video_total"] == 1.5


@pytest.mark.parametrize("extra, message", [
    (["--settings", "plain", "fast"], "unknown setting(s) fast"),
    (["--num-frames", "12"], "multiple of 8"),
    (["--clips", "0"], "--clips 0: it must be positive"),
    (["--reuse", "missing.pt"], "--reuse missing.pt: no such file"),
])
def test_bad_options_exit_2_before_any_work(ckpt, tmp_path, monkeypatch, extra, message, capsys):
    monkeypatch.setattr(runs, "run", lambda cmd, log: pytest.fail(f"ran {cmd}"))
    with pytest.raises(SystemExit) as e:
        tradeoff.main(["--ckpt", ckpt, "--out", str(tmp_path / "t"), *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tradeoff.main(["--ckpt", str(tmp_path / "none.pt")])
    assert e.value.code == 2 and "none.pt: no such file" in capsys.readouterr().err
