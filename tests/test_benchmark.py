"""benchmark.py --train-step: the table of training steps and DDIM sampling runs and prints measured figures."""
import re
import sys

import benchmark


def test_train_step_and_sample_tables(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--train-step", "--model", "tiny", "--size", "8", "--frames",
                                      "3", "--images", "2", "--batches", "2", "1", "--compile", "eager", "--repeat",
                                      "2", "--sample", "--sample-videos", "2", "--sample-steps", "3"])
    benchmark.main()
    out = capsys.readouterr().out
    steps = re.findall(r"^eager\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+([\d.]+)%", out, re.M)
    assert [int(b) for b, *_ in steps] == [2, 1], out
    for batch, ms, clips, pct in steps:  # clips/s is the batch over the measured step time
        assert float(ms) > 0 and abs(float(clips) - int(batch) / float(ms) * 1000) < 0.1 + 0.01 * float(clips)
        assert 0 < float(pct) < 100
    assert re.search(r"^eager\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out.split("DDIM sampling")[1], re.M), out


def test_align_table(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--train-step", "--model", "tiny", "--size", "4", "--frames",
                                      "2", "--images", "1", "--batches", "2", "--compile", "eager", "--repeat", "2",
                                      "--align", "--align-nets", "S/16"])
    benchmark.main()
    out = capsys.readouterr().out.split("flow alignment")[1]
    assert "4 flows of 32 x 32" in out, out
    plain = float(re.search(r"^eager step without the loss\s+([\d.]+)\s+1\.00$", out, re.M).group(1))
    with_loss, ratio = map(float, re.search(r"^eager step with the loss\s+([\d.]+)\s+([\d.]+)$", out, re.M).groups())
    assert abs(with_loss / plain - ratio) < 0.01 + 0.01 * ratio
    ms, ratio = map(float, re.search(r"^targets, DINO S/16 \(random weights\)\s+([\d.]+)\s+([\d.]+)$", out, re.M).groups())
    assert ms > 0 and abs(ms / plain - ratio) < 0.01 + 0.01 * ratio
