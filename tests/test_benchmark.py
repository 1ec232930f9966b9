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


def test_flops_are_never_counted_on_the_compiled_model(monkeypatch, capsys):
    """Run under the FLOP counter, compiled blocks fell back to eager kernels: the count takes a model of its own.
    --profile adds one step's table (on the CPU, its top operators)."""
    counting, compiled_calls = [], []

    class Counter:
        def __init__(self, display):
            pass

        def __enter__(self):
            counting.append(True)

        def __exit__(self, *exc):
            counting.clear()

        def get_total_flops(self):
            return 10 ** 9

    def compile_blocks(model):  # stands in for torch.compile: records whether the counter is on at each call
        forward = model.forward
        model.forward = lambda *a, **k: (compiled_calls.append(bool(counting)), forward(*a, **k))[1]
        return model
    monkeypatch.setattr(benchmark, "FlopCounterMode", Counter)
    monkeypatch.setattr(benchmark.dit, "compile_blocks", compile_blocks)
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--train-step", "--model", "tiny", "--size", "4", "--frames",
                                      "2", "--images", "1", "--batches", "2", "--compile", "blocks", "--repeat", "2",
                                      "--profile"])
    benchmark.main()
    out = capsys.readouterr().out
    assert compiled_calls and not any(compiled_calls)
    assert re.search(r"^blocks\s+2\s+[\d.]+\s+[\d.]+\s+0\.00\s", out, re.M), out  # 1e9 FLOPs = 0.00 TFLOP
    assert "Self CPU time total" in out  # the profile of the step
