"""benchmark.py: the tables of training steps, DDIM sampling and long videos run and print measured figures."""
import argparse
import json
import re
import sys

import pytest
import torch
from PIL import Image

from experiments import benchmark


def test_train_step_and_sample_tables(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--train-step", "--model", "tiny", "--size", "8", "--frames",
                                      "3", "--images", "2", "--batches", "2", "1", "--compile", "eager", "--repeat",
                                      "2", "--sample", "--sample-videos", "2", "--sample-steps", "3"])
    benchmark.main()
    out = capsys.readouterr().out
    steps = re.findall(r"^eager\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+([\d.]+)%", out, re.M)
    assert [int(b) for b, *_ in steps] == [2, 1], out
    for batch, ms, host, clips, pct in steps:  # clips/s is the batch over the measured step time
        assert float(ms) > 0 and abs(float(clips) - int(batch) / float(ms) * 1000) < 0.1 + 0.01 * float(clips)
        assert 0 < float(host) and 0 < float(pct) < 100
    assert re.search(r"^eager\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out.split("DDIM sampling")[1], re.M), out


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

    def compile_blocks(model, **kwargs):  # stands in for torch.compile: records whether the counter is on
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
    assert re.search(r"^blocks\s+2\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+0\.00\s", out, re.M), out  # 1e9 FLOPs: 0.00 TFLOP
    assert "Self CPU time total" in out  # the profile of the step


def test_graphs_mode_replays_the_compiled_blocks_as_cuda_graphs(monkeypatch, capsys):
    """--compile graphs: the blocks compiled with mode "reduce-overhead", and every step and every sampling call
    begins a new replay (without it, a step would read outputs the last one overwrote). fused AdamW is asked for."""
    modes, begins, fused = [], [], []
    monkeypatch.setattr(benchmark.dit, "compile_blocks", lambda model, **kw: (modes.append(kw.get("mode")), model)[1])
    monkeypatch.setattr(benchmark.torch.compiler, "cudagraph_mark_step_begin", lambda: begins.append(1))
    adamw = torch.optim.AdamW

    def record_adamw(params, **kw):
        fused.append(kw.get("fused", False))
        return adamw(params, **{k: v for k, v in kw.items() if k != "fused"})  # fused needs CUDA
    monkeypatch.setattr(benchmark.torch.optim, "AdamW", record_adamw)
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--train-step", "--model", "tiny", "--size", "4", "--frames",
                                      "2", "--images", "1", "--batches", "2", "--compile", "graphs", "--repeat", "2",
                                      "--adamw", "fused", "--sample", "--sample-videos", "1", "--sample-steps", "3"])
    benchmark.main()
    out = capsys.readouterr().out
    assert modes == ["reduce-overhead", "reduce-overhead"]  # the step's model and the sampling's
    assert re.search(r"^graphs\s+2\s+[\d.]+\s+[\d.]+", out, re.M) and "AdamW: fused" in out, out
    assert fused == [True]
    # the step: 1 first + 3 warm-up + 2 timed; sampling: 2 + 3 DDIM steps, one model call each
    assert len(begins) == 1 + 3 + 2 + 2 + 3, len(begins)


def test_long_video_table_json_and_plot(monkeypatch, tmp_path, capsys):
    """Both models at every length; a length that runs out of memory ends that model's row (the longer ones are
    not tried), is written as null and drawn as a cross."""
    timed = []

    def fake_time_call(fn, repeat, device, warmup=3):
        fn()  # one real step, so that the model is built and runs at that length
        frames = timed_frames[-1]  # the length of the latents the row made last
        if frames >= 9 and timed_kind[-1] == "peer":  # as Inductor raises it while compiling: wrapped
            raise RuntimeError("backend compiler failed") from torch.OutOfMemoryError("fake")
        timed.append(frames)
        return float(frames)
    timed_frames, timed_kind = [], []
    build = benchmark.build

    def recording_build(args, mode, device, kind="medsora", scan="chunked"):
        timed_kind.append(kind)
        return build(args, mode, device, kind, scan)
    original_randn = torch.randn

    def recording_randn(*shape, **kw):
        if len(shape) == 5 and shape[0] == 1:
            timed_frames.append(shape[1])
        return original_randn(*shape, **kw)
    monkeypatch.setattr(benchmark, "time_call", fake_time_call)
    monkeypatch.setattr(benchmark, "build", recording_build)
    monkeypatch.setattr(benchmark.torch, "randn", recording_randn)
    out_json, out_png = tmp_path / "b.json", tmp_path / "long.png"
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--model", "tiny", "--size", "4", "--compile", "eager",
                                      "--long", "2", "5", "9", "17", "--json", str(out_json), "--plot", str(out_png)])
    benchmark.main()
    rows = json.load(open(out_json))["rows"]
    got = [(r["model"].startswith("the peer"), r["latent_frames"], r["pixel_frames"], r["ms"]) for r in rows]
    assert got == [(False, 2, 5, 2.0), (False, 5, 17, 5.0), (False, 9, 33, 9.0), (False, 17, 65, 17.0),
                   (True, 2, 5, 2.0), (True, 5, 17, 5.0), (True, 9, 33, None), (True, 17, 65, None)]
    assert [r["scan"] for r in rows] == ["chunked"] * 4 + ["attention"] * 4  # no kernels on the CPU
    out = capsys.readouterr().out
    assert out.count("out of memory") == 1 and out.count("not tried") == 1
    assert Image.open(out_png).size == (720, 360)


def test_long_rows_name_the_scan_path_the_default_takes(monkeypatch):
    """With mamba-ssm's kernels, MedSora's default scan takes them for the spatial planes once f x w steps span more
    than one chunk (256), and stays chunked for the temporal sequences of f steps (both, when f > 256)."""
    args = argparse.Namespace(model="B", size=16)  # 8 x 8 tokens a frame: planes of 8 f steps
    monkeypatch.setattr(benchmark.ssm, "kernels_available", lambda device: True)
    got = [benchmark.long_scans(args, f, torch.device("cuda")) for f in (5, 32, 33, 257)]
    assert got == ["chunked", "chunked", "kernel/chunked", "kernel"]
    assert benchmark.long_scans(args, 257, torch.device("cuda"), "chunked") == "chunked"  # --long-scans chunked
    monkeypatch.setattr(benchmark.ssm, "kernels_available", lambda device: False)
    assert benchmark.long_scans(args, 257, torch.device("cpu")) == "chunked"


def test_long_scans_give_medsora_one_set_of_rows_each(monkeypatch, tmp_path):
    """--long-scans auto chunked: MedSora is built with each scan in turn, its rows say which, and the peer once."""
    built = []
    build = benchmark.build

    def recording_build(args, mode, device, kind="medsora", scan="chunked"):
        built.append((kind, scan))
        return build(args, mode, device, kind, scan)
    monkeypatch.setattr(benchmark, "build", recording_build)
    monkeypatch.setattr(benchmark, "time_call", lambda fn, repeat, device: (fn(), 1.0)[1])
    out_json, out_png = tmp_path / "b.json", tmp_path / "long.png"
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--model", "tiny", "--size", "4", "--compile", "eager",
                                      "--long", "2", "3", "--long-scans", "auto", "chunked", "--json", str(out_json),
                                      "--plot", str(out_png)])
    benchmark.main()
    assert built == [("medsora", "auto")] * 2 + [("medsora", "chunked")] * 2 + [("peer", "auto")] * 2
    rows = json.load(open(out_json))["rows"]
    assert [(r["scans"], r["latent_frames"]) for r in rows] == [("auto", 2), ("auto", 3), ("chunked", 2),
                                                               ("chunked", 3), (None, 2), (None, 3)]
    assert Image.open(out_png).size == (720, 360)


def test_out_of_memory_is_found_behind_the_errors_that_wrap_it():
    def raised(make):
        try:
            make()
        except Exception as e:
            return e
    assert benchmark.out_of_memory_error(torch.OutOfMemoryError("direct"))

    def wrapped():
        try:
            raise torch.OutOfMemoryError("inside")
        except torch.OutOfMemoryError:
            raise RuntimeError("while handling it")  # __context__, not __cause__
    assert benchmark.out_of_memory_error(raised(wrapped))
    assert not benchmark.out_of_memory_error(raised(lambda: 1 / 0))  # any other error is raised on


def test_medsora_trains_and_samples_at_65_latent_frames():
    """The long-video lengths run: 65 latent frames (257 pixel frames), tiny model, 4 x 4 latents."""
    cfg = benchmark.dit.make_config("tiny", scan="chunked")
    torch.manual_seed(0)
    model = benchmark.dit.MedSora(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t = torch.randn(1, 65, 16, 4, 4), torch.tensor([500])
    losses = []
    for _ in range(3):  # fit one batch: the loss falls
        loss = torch.nn.functional.mse_loss(model(x, t, num_frames=65), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    z = benchmark.Diffusion().ddim_sample(model.eval(), (1, 65, 16, 4, 4), steps=2,
                                          generator=torch.Generator().manual_seed(0), num_frames=65)
    assert z.shape == (1, 65, 16, 4, 4) and torch.isfinite(z).all()


def test_layer_table_times_each_scan_path(capsys):
    rows = benchmark.layer_table(torch.device("cpu"), 1, [(2, 4), (1, 12)], ["recurrent", "chunked", "kernel"])
    assert [(r["sequences"], r["length"]) for r in rows] == [(2, 4), (1, 12)]
    for r in rows:  # the kernels need CUDA: left out on the CPU
        assert set(k for k in r if k.startswith("ms_")) == {"ms_recurrent", "ms_chunked"}
        assert r["ms_recurrent"] > 0 and r["ms_chunked"] > 0
    assert re.search(r"^\s+1 x 12\s+[\d.]+\s+[\d.]+$", capsys.readouterr().out, re.M)


def test_layer_table_shows_a_path_that_fails_and_goes_on(monkeypatch, capsys):
    """A compiler error on one path at one shape leaves that cell 'failed' (None in the rows); the others run."""
    def broken_compile(module):
        def run(u):
            raise RuntimeError("code generation failed")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    rows = benchmark.layer_table(torch.device("cpu"), 1, [(1, 12)], ["chunked", "chunked+compile"])
    assert rows[0]["ms_chunked"] > 0 and rows[0]["ms_chunked+compile"] is None
    out = capsys.readouterr().out
    assert "1 x 12, chunked+compile failed: RuntimeError: code generation failed" in out
    assert re.search(r"^\s+1 x 12\s+[\d.]+\s+failed$", out, re.M)


def test_scan_path_tables_go_to_the_json(monkeypatch, tmp_path):
    """The whole-model scan-path rows and the layer rows both reach --json, one row per path and per shape."""
    out_json = tmp_path / "paths.json"
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--model", "tiny", "--batch", "1", "--frames", "2", "--images",
                                      "1", "--size", "8", "--paths", "chunked", "--dtypes", "fp32", "--repeat", "1",
                                      "--layers", "1x12", "--layer-paths", "recurrent", "chunked",
                                      "--json", str(out_json)])
    benchmark.main()
    saved = json.load(open(out_json))
    model_rows, layer_rows = saved["rows"]
    assert saved["device"] == "CPU"
    assert model_rows["table"] == "scan paths" and model_rows["path"] == "chunked" and model_rows["ms"] > 0
    assert model_rows["peak_gib"] is None  # no CUDA memory counter on the CPU
    assert (layer_rows["sequences"], layer_rows["length"]) == (1, 12) and layer_rows["ms_recurrent"] > 0


def test_component_table_times_each_branch_and_the_block(monkeypatch, capsys, tmp_path):
    out_json = tmp_path / "b.json"
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--train-step", "--model", "tiny", "--size", "8", "--frames",
                                      "3", "--images", "2", "--batches", "2", "--compile", "eager", "--repeat", "2",
                                      "--components", "--json", str(out_json)])
    benchmark.main()
    out = capsys.readouterr().out.split("one MedSora-tiny block")[1]
    assert "x (2, 5, 16, 128)" in out, out  # batch 2, 3 + 2 frames, a 4 x 4 token grid, width 128
    rows = [r for r in json.load(open(out_json))["rows"] if r["table"] == "block parts"]
    assert [r["part"] for r in rows] == ["attention", "spatial Mamba", "temporal Mamba", "whole block"]
    assert all(r["ms_eager"] > 0 and r["batch"] == 2 for r in rows)


def test_component_table_compiles_each_part_and_replays_graphs(monkeypatch, capsys):
    """Each part is compiled on its own (mode reduce-overhead for graphs), and every graphs call begins a replay."""
    modes, begins = [], []
    monkeypatch.setattr(benchmark.dit, "compile_blocks", lambda model, **kw: model)  # the step table: not under test
    monkeypatch.setattr(benchmark.torch, "compile", lambda fn, **kw: (modes.append(kw.get("mode", "default")), fn)[1])
    monkeypatch.setattr(benchmark.torch.compiler, "cudagraph_mark_step_begin", lambda: begins.append(1))
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--train-step", "--model", "tiny", "--size", "4", "--frames",
                                      "2", "--images", "1", "--batches", "1", "--compile", "blocks", "graphs",
                                      "--repeat", "1", "--components"])
    benchmark.main()
    out = capsys.readouterr().out.split("one MedSora-tiny block")[1]
    assert modes == ["default", "reduce-overhead"] * 4
    assert re.search(r"^whole block\s+[\d.]+\s+[\d.]+$", out, re.M), out
    begins_in_step_table = 1 + 3 + 1  # first step, warm-up, one timed (graphs rows of the step table)
    assert len(begins) == begins_in_step_table + 4 * (3 + 1)  # 4 parts x (3 warm-up + 1 timed) in graphs mode


def test_recompute_rows_count_one_steps_flops_and_refuse_cuda_graphs(monkeypatch, capsys):
    """--recompute runs each block's forward twice; the FLOPs (and so % of peak) stay those of one step."""
    args = type("Args", (), {"model": "tiny", "frames": 2, "recompute": False})()
    x, t = torch.randn(1, 3, 16, 4, 4), torch.tensor([5])
    plain = benchmark.count_flops(args, x, t, torch.device("cpu"), False)
    args.recompute = True
    assert benchmark.count_flops(args, x, t, torch.device("cpu"), False) == plain
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--train-step", "--recompute", "--compile", "graphs"])
    with pytest.raises(SystemExit) as e:
        benchmark.main()
    assert e.value.code == 2 and "--recompute with --compile graphs" in capsys.readouterr().err


def test_vae_speed_times_each_precision_and_counts_the_flops(tmp_path, capsys):
    from experiments import vae_speed
    rows = vae_speed.main(["--size", "16", "--frames", "8", "--batches", "1", "2", "--compile", "none",
                           "--repeat", "1", "--json", str(tmp_path / "v.json")])
    assert [(r["batch"], r["precision"]) for r in rows] == [(1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")]
    assert all(r["ms"] > 0 and r["peak_fraction"] > 0 for r in rows)
    assert rows[2]["tflop_per_step"] == pytest.approx(2 * rows[0]["tflop_per_step"], rel=0.01)  # linear in the batch
    assert json.load(open(tmp_path / "v.json"))["rows"] == rows
    with pytest.raises(SystemExit):
        vae_speed.main(["--frames", "6"])
    assert "--frames 6: it must be a positive multiple of 8" in capsys.readouterr().err
