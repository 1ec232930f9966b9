"""Bad input, as a careful user would give it, against the four scripts: each case is one line and a clean exit
(status 2 for a bad argument, checked before any work; 1 for a bad file, with what to do), and nothing on disk
is damaged. The scripts run in-process through distributed.cli, as their `__main__` runs them."""

import os
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
from PIL import Image

import checkpoint
import data
import distributed
import evaluate
import sample
import train
import train_vae
import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"data": data.main, "train": train.main, "train_vae": train_vae.main, "sample": sample.main, "evaluate": evaluate.main}
# 9-frame 32 x 32 clips of 8 training clips: a run of a few steps takes seconds
TRAIN = ["--size", "32", "--num-frames", "8", "--num-images", "2", "--max-clips", "8", "--batch-size", "2", "2",
         "--workers", "0", "--sample-every", "0", "--sample-steps", "2"]
VAE = ["--size", "32", "--num-frames", "8", "--batch-size", "2", "--workers", "0", "--val-clips", "2"]


def fails(script, argv, capsys):
    """(exit status, the one line the user sees) of a script that must stop."""
    with pytest.raises(SystemExit) as e:
        distributed.cli(SCRIPTS[script], argv)
    code = e.value.code
    err = capsys.readouterr().err.strip()
    if isinstance(code, str):  # sys.exit("error: ...") prints the message and exits with status 1
        code, err = 1, code
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert "Traceback" not in err and len(lines) == 1, err
    return code, lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny VAE, a MedSora run of 2 steps on it, damaged copies of both, and bad data folders."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    cfg = vae.MODELS["tiny"]
    vae_path = str(root / "vae.pt")
    checkpoint.save({"model": vae.VideoVAE(cfg).state_dict(), "config": asdict(cfg)}, vae_path)
    run = str(root / "run")
    train.main(TRAIN + ["--vae", vae_path, "--out", run, "--max-steps", "2"])
    good = open(os.path.join(run, "ckpt.pt"), "rb").read()
    f = {"vae": vae_path, "run": run, "ckpt": os.path.join(run, "ckpt.pt"), "root": str(root)}
    for name, content in {"truncated": good[: len(good) // 2], "random": os.urandom(4096),
                          "notes": b"not a folder", "overwritten": good[:20000] + bytes(2048) + good[22048:]
                          }.items():
        f[name] = str(root / (name + (".txt" if name == "notes" else ".pt")))
        open(f[name], "wb").write(content)
    ckpt = torch.load(f["ckpt"], weights_only=True)
    ckpt["ema"][next(iter(ckpt["ema"]))] = torch.full_like(next(iter(ckpt["ema"].values())), float("nan"))
    f["nan"] = str(root / "nan.pt")
    checkpoint.save(ckpt, f["nan"])
    for folder in ("empty", "avis/a", "few/v1"):
        os.makedirs(root / folder)
    open(root / "avis" / "a" / "clip.avi", "wb").write(b"RIFF")
    for i in range(3):  # a video of 3 frames: a 9-frame clip at stride 3 needs 25
        Image.new("RGB", (32, 32), (120, 40, 40)).save(root / "few" / "v1" / f"{i:06d}.jpg")
    return f


ARGUMENTS = [  # (script, arguments, what the one line must say): each is refused before any work, status 2
    ("train", ["--out", "{notes}"], "--out {notes}: it is a file"),
    ("train_vae", ["--num-frames", "10"], "--num-frames 10: it must be a positive multiple of 8 (clips are 8k + 1"),
    ("train_vae", ["--size", "60"], "--size 60: it must be a positive multiple of 8"),
    ("train_vae", ["--steps", "0"], "--steps 0: it must be positive"),
    ("train_vae", ["--batch-size", "-2"], "--batch-size -2: it must be positive"),
    ("train_vae", ["--lr", "0"], "--lr 0.0: it must be positive"),
    ("train_vae", ["--kl-weight", "-1"], "--kl-weight -1.0: it must not be negative"),
    ("train_vae", ["--out", "{notes}"], "--out {notes}: it is a file"),
    # sample.py checks before it looks for the run: a missing run is not what these report
    ("sample", ["--run", "{root}/none", "--num-videos", "0"], "--num-videos 0: it must be positive"),
    ("sample", ["--run", "{root}/none", "--batch-size", "0"], "--batch-size 0: it must be positive"),
    ("sample", ["--run", "{root}/none", "--steps", "0"], "--steps 0: DDIM takes 1 to 1000 steps"),
    ("sample", ["--run", "{root}/none", "--steps", "1001"], "--steps 1001: DDIM takes 1 to 1000 steps"),
    ("sample", ["--run", "{root}/none", "--eta", "-1"], "--eta -1.0: it must be between 0 and 1"),
    ("sample", ["--run", "{root}/none", "--out", "{notes}"], "--out {notes}: it is a file"),
    ("evaluate", ["--real", "synthetic", "--fake", "{root}", "--frames", "8"], "--frames 8: the I3D network of FVD"),
    ("evaluate", ["--real", "synthetic", "--fake", "{root}", "--num-clips", "1"], "--num-clips 1: the metrics"),
    ("evaluate", ["--real", "synthetic", "--fake", "{root}", "--batch-size", "0"], "--batch-size 0: it must be"),
]


SECOND_SWEEP = [  # refused before any work, status 2
    ("train", ["--ema", "nan"], "--ema nan: not a finite number"),
    ("train", ["--clip-norm", "nan"], "--clip-norm nan: not a finite number"),
    ("train", ["--ema", "1.5"], "--ema 1.5: it must be between 0 and 1"),
    ("train", ["--ema", "-1"], "--ema -1.0: it must be between 0 and 1"),
    ("train", ["--clip-norm", "0"], "--clip-norm 0.0: it must be positive"),
    ("train", ["--lr", "inf", "1e-4"], "--lr inf 0.0001: not a finite number"),
    ("train", ["--seed", "-1"], "--seed -1: it must not be negative"),
    ("train", ["--out", ""], "--out is empty"),
    ("train_vae", ["--betas", "0.5", "1.5"], "--betas 0.5 1.5: each must be in [0, 1)"),
    ("train_vae", ["--max-minutes", "nan"], "--max-minutes nan: not a finite number"),
    ("sample", ["--run", "{root}/none", "--eta", "5"], "--eta 5.0: it must be between 0 and 1"),
    ("sample", ["--run", "{root}/none", "--clip-x0", "inf"], "--clip-x0 inf: not a finite number"),
    ("evaluate", ["--real", "synthetic", "--fake", "{root}", "--seed", "-3"], "--seed -3: it must not be negative"),
    ("data", ["prepare", "--src", "{root}", "--dst", "{root}/../out", "--size", "0"], "--size 0: it must be positive"),
]


THIRD_SWEEP = [  # refused before any work, status 2
    ("train", ["--cache-dir", "{notes}"], "--cache-dir {notes}: it is a file; give a folder"),
    ("evaluate", ["--real", "synthetic", "--fake", "synthetic", "--cache", "{notes}"], "--cache {notes}: it is a file"),
    ("evaluate", ["--real", "synthetic", "--fake", "synthetic", "--out", "{root}/empty"],
     "--out '{root}/empty': give the path of a file to write, not a folder"),
    ("data", ["prepare", "--src", "{root}/few", "--dst", "{notes}"], "--dst {notes}: it is a file"),
    ("data", ["stats", "--samples", "0"], "--samples 0: it must be positive"),
]


@pytest.mark.parametrize("script, argv, message", ARGUMENTS + SECOND_SWEEP + THIRD_SWEEP)
def test_bad_arguments(script, argv, message, files, capsys):
    code, line = fails(script, [a.format(**files) for a in argv], capsys)
    assert code == 2 and message.format(**files) in line, line


FILES = [  # (script, arguments, what the one line must say): status 1, the file named
    ("train", ["--data", "{root}/none"], "data root {root}/none does not exist"),
    ("train", ["--data", "{notes}"], "data {notes} is a file"),
    ("train", ["--data", "{root}/empty"], "no frame folders in {root}/empty"),
    ("train", ["--data", "{root}/avis"], "{root}/avis holds 1 video files but no frame folders"),
    ("train", ["--data", "{root}/few"], "has the 25 frames a clip needs"),
    ("train_vae", ["--data", "{root}/few"], "has the 25 frames a clip needs"),
    ("data", ["stats", "--data", "{notes}"], "data {notes} is a file"),
    ("data", ["stats", "--data", "{root}/avis"], "{root}/avis holds 1 video files but no frame folders"),
    ("train", ["--vae", "{root}/none.pt"], "no VAE at {root}/none.pt"),
    ("train", ["--vae", "{random}"], "{random} is damaged"),
    ("train", ["--vae", "{truncated}"], "{truncated} is damaged"),
    ("train", ["--vae", "{ckpt}"], "{ckpt} is not a train_vae.py checkpoint (expected its 'model' and 'config' "
                                   "entries; this one is a MedSora checkpoint)"),
    ("sample", ["--run", "{root}/none"], "no checkpoint (*.pt) in {root}/none"),
    ("sample", ["--ckpt", "{truncated}"], "{truncated} is damaged"),
    ("sample", ["--ckpt", "{overwritten}"], "{overwritten} is damaged"),
    ("sample", ["--ckpt", "{nan}"], "{nan}: the EMA weights hold NaN or infinite values"),
    ("sample", ["--ckpt", "{vae}"], "{vae} is not a train.py checkpoint"),
    ("evaluate", ["--vae", "{ckpt}", "--real", "synthetic", "--frames", "8", "--size", "32", "--num-clips", "2"],
     "{ckpt} is not a train_vae.py checkpoint"),
]


@pytest.mark.parametrize("script, argv, message", FILES)
def test_bad_files(script, argv, message, files, capsys, tmp_path):
    base = {"train": TRAIN + ["--vae", files["vae"], "--max-steps", "1", "--out", str(tmp_path / "out")],
            "train_vae": VAE + ["--steps", "1", "--out", str(tmp_path / "out")], "sample": [], "evaluate": [],
            "data": []}
    code, line = fails(script, base[script] + [a.format(**files) for a in argv], capsys)
    assert code == 1 and line.startswith("error: ") and message.format(**files) in line, line


def resumed_run(files, tmp_path, name):
    out = str(tmp_path / "resume")
    os.makedirs(out)
    with open(files["ckpt"], "rb") as f, open(os.path.join(out, "ckpt.pt"), "wb") as g:
        g.write(f.read() if name is None else open(files[name], "rb").read())
    return out, TRAIN + ["--vae", files["vae"], "--out", out, "--max-steps", "4", "--resume"]


@pytest.mark.parametrize("name, message", [("truncated", "is damaged"), ("overwritten", "is damaged"),
                                           ("nan", "holds NaN or infinite values in 1 tensors (first ema.")])
def test_resume_refuses_a_damaged_checkpoint_and_keeps_it(name, message, files, capsys, tmp_path):
    out, argv = resumed_run(files, tmp_path, name)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    code, line = fails("train", argv, capsys)
    assert code == 1 and message in line and os.path.join(out, "ckpt.pt") in line
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_resuming_a_finished_run_changes_nothing(files, capsys, tmp_path):
    out, argv = resumed_run(files, tmp_path, None)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    train.main(argv[:-3] + ["--max-steps", "2", "--resume"])  # the run ended at step 2
    assert "has already finished (step 2" in capsys.readouterr().out
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before and not os.path.exists(
        os.path.join(out, "log.jsonl"))

    vae_out = str(tmp_path / "vae")
    train_vae.main(VAE + ["--steps", "1", "--out", vae_out])
    before = open(os.path.join(vae_out, "ckpt.pt"), "rb").read()
    train_vae.main(VAE + ["--steps", "1", "--out", vae_out, "--resume"])
    assert "has already trained 1 of --steps 1" in capsys.readouterr().out
    assert open(os.path.join(vae_out, "ckpt.pt"), "rb").read() == before


def test_a_run_folder_in_use_is_refused_and_a_killed_runs_lock_is_not(files, capsys, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, distributed; "
                               "lock = distributed.RunLock(sys.argv[1], 0); print('locked', flush=True); "
                               "time.sleep(300)", str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, line = fails("train", TRAIN + ["--vae", files["vae"], "--out", str(out), "--max-steps", "1"], capsys)
        assert code == 1 and f"{out} is in use by process {holder.pid} on " in line
        assert sorted(os.listdir(out)) == ["lock"]  # stopped before writing anything
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays behind
        holder.wait()
    assert (out / "lock").exists()
    train.main(TRAIN + ["--vae", files["vae"], "--out", str(out), "--max-steps", "1"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1
    assert f"process {os.getpid()} " in (out / "lock").read_text()


def test_the_scripts_main_is_guarded(files, tmp_path):
    """`python script.py ...` itself: one line on stderr, no traceback, the exit status."""
    for argv, status, message in ((["sample.py", "--ckpt", files["truncated"]], 1, "is damaged"),
                                  (["train.py", "--size", "60"], 2, "--size 60: it must be a positive multiple")):
        got = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = [x for x in got.stderr.splitlines() if x.strip() and not x.startswith(("usage:", " "))]
        assert got.returncode == status and len(lines) == 1 and message in lines[0], got.stderr


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save({"w": torch.ones(3)}, path)
    os.symlink("/dev/full", path + ".tmp")  # every write to the temporary file fails with ENOSPC, as on a full disk
    with pytest.raises(OSError, match="no space left on the disk while writing .*ckpt.pt .*the previous checkpoint "
                                      "is intact; free some space, then --resume"):
        checkpoint.save({"w": torch.zeros(1000)}, path)
    assert not os.path.lexists(path + ".tmp")  # nothing left that blocks the next save or resume
    assert torch.equal(checkpoint.load(path)["w"], torch.ones(3))


def test_one_line_unless_debug(files, capsys, monkeypatch):
    argv = ["--ckpt", files["truncated"]]
    assert fails("sample", argv, capsys)[1].endswith("(--debug shows where)")
    with pytest.raises(ValueError, match="is damaged"):  # the traceback is the user's to see
        distributed.cli(sample.main, argv + ["--debug"])
    monkeypatch.setenv("MEDSORA_DEBUG", "1")
    with pytest.raises(ValueError, match="is damaged"):
        distributed.cli(sample.main, argv)


def test_a_script_error_that_is_a_bug_keeps_its_traceback():
    def buggy(argv):
        return [][1]
    with pytest.raises(IndexError):
        distributed.cli(buggy, [])



# ---------------------------------------------------------------------------------------------------------
# The silent failures of a second sweep: each once wrong with exit 0, now one line and nothing written
# ---------------------------------------------------------------------------------------------------------

class Payload:
    """What a crafted checkpoint carries: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_upgrade_never_runs_a_files_code(files, tmp_path):
    marker, path = str(tmp_path / "ran"), str(tmp_path / "crafted.pt")
    ckpt = torch.load(files["ckpt"], weights_only=True)
    torch.save({**ckpt, "extra": Payload(marker)}, path)
    before = open(path, "rb").read()
    with pytest.raises(ValueError, match="not upgraded, and left as it was: it asks for objects that no version"):
        checkpoint.upgrade(path)
    assert not os.path.exists(marker) and open(path, "rb").read() == before
    with pytest.raises(ValueError, match="runs nothing from the file"):  # what a loader's refusal recommends
        checkpoint.load(path)
    assert not os.path.exists(marker)


def test_upgrade_rewrites_what_earlier_versions_wrote(files, tmp_path):
    """Earlier versions pickled NumPy's RNG state as an array: upgraded, the file loads without running code."""
    import numpy as np
    path = str(tmp_path / "old.pt")
    ckpt = torch.load(files["ckpt"], weights_only=True)
    ckpt["rng"] = [{**ckpt["rng"][0], "numpy": np.random.get_state()}]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="refused to load"):
        checkpoint.load(path)
    checkpoint.upgrade(path)
    state = checkpoint.load(path)["rng"][0]["numpy"]
    assert torch.equal(state["keys"], torch.from_numpy(np.random.get_state()[1].astype(np.int64)))


def test_nan_in_the_optimizer_state_is_refused_and_the_checkpoint_kept(files, capsys, tmp_path):
    out, argv = resumed_run(files, tmp_path, None)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    moments = ckpt["optimizer"]["state"][0]
    moments["exp_avg"] = torch.full_like(moments["exp_avg"], float("nan"))
    checkpoint.save(ckpt, os.path.join(out, "ckpt.pt"))
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    code, line = fails("train", argv, capsys)
    assert code == 1 and "holds NaN or infinite values in 1 tensors (first optimizer.state.0.exp_avg)" in line
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_non_finite_weights_never_replace_a_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(RuntimeError, match="not saving .*NaN or infinite values \\(first model.w\\); the last "
                                           "checkpoint is kept"):
        checkpoint.save_run({"model": {"w": torch.tensor([1.0, float("inf")])}}, path, 0, 1)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(2))


def test_resume_with_another_vae_is_refused(files, capsys, tmp_path):
    other = str(tmp_path / "other_vae.pt")
    saved = torch.load(files["vae"], weights_only=True)
    checkpoint.save({**saved, "config": {**saved["config"], "scaling_factor": 2.44}}, other)
    out, argv = resumed_run(files, tmp_path, None)
    argv[argv.index("--vae") + 1] = other
    code, line = fails("train", argv, capsys)
    assert code == 1 and f"--vae {other} is not the VAE" in line and "scaling_factor" in line


def avi(path, frames=60, damage=False):
    """A small MPEG-4 AVI written with PyAV; with damage, bytes in its middle overwritten (as a bad copy would)."""
    av = pytest.importorskip("av")
    import numpy as np
    container = av.open(path, "w")
    stream = container.add_stream("mpeg4", rate=25)
    stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
    for i in range(frames):
        img = np.zeros((96, 128, 3), np.uint8)
        img[:, :, 0] = (np.arange(128)[None] * 2 + 3 * i) % 255
        img[:, :, 1] = (np.arange(96)[:, None] * 2) % 255
        img[20:40, (2 * i) % 100:(2 * i) % 100 + 20] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    if damage:
        data_ = bytearray(open(path, "rb").read())
        g = torch.Generator().manual_seed(1)
        start = int(0.7 * len(data_))  # late in the file: the frames before the damage decode soundly
        for offset in range(start, start + 2000, 97):
            data_[offset] = int(torch.randint(256, (1,), generator=g))
        open(path, "wb").write(bytes(data_))


def test_prepare_cuts_a_video_at_the_damage_and_counts_it(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    avi(str(src / "bad.avi"), damage=True)
    avi(str(src / "good.avi"))
    results = data.prepare(str(src), str(dst), size=32, min_frames=10, workers=1)
    (name, message), = results["cut"]
    assert name == "bad" and "is damaged (the decoder reports it corrupt)" in message
    kept = int(message.split("kept the ")[1].split()[0])
    assert 10 <= kept < 60 and len(os.listdir(dst / "bad")) == kept
    assert [n for n, _ in results["prepared"]] == ["good"] and len(os.listdir(dst / "good")) == 60
    assert "cut at damage 1" in capsys.readouterr().out


def test_prepare_gives_every_source_its_own_name(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for folder in ("a__b", "a/b"):
        (src / folder).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(src / folder / f"{i:06d}.jpg")
    avi(str(src / "clip.avi"), frames=3)
    avi(str(src / "clip.mkv"), frames=3)
    results = data.prepare(str(src), str(dst), size=16, min_frames=3, workers=2)
    names = sorted(n for n, _ in results["prepared"])
    assert len(names) == 4 and len(set(names)) == 4 and not results["failed"]
    assert all(n.startswith(("a__b-", "clip-")) for n in names)
    assert sorted(os.listdir(dst)) == sorted(names + ["lock"])


def test_experiments_check_their_arguments_before_any_work(files, capsys, tmp_path):
    from experiments import curve, tradeoff
    for main, argv, message in (
            (curve.main, ["--eval-jobs", "0"], "--eval-jobs 0: it must be positive"),
            (curve.main, ["--budget-minutes", "nan"], "--budget-minutes nan: not a finite number"),
            (curve.main, ["--out", files["notes"]], f"--out {files['notes']}: it is a file"),
            (curve.main, ["--points", "6", "3"], "--points 6.0 3.0: give increasing minutes"),
            (tradeoff.main, ["--ckpt", files["truncated"]], f"{files['truncated']} is damaged"),
            (tradeoff.main, ["--ckpt", files["ckpt"], "--clips", "1"], "--clips 1: FVD compares two distributions")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(tmp_path / "x")] if "--out" not in argv else argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, err
    assert not os.path.exists(tmp_path / "x")  # nothing written


def test_os_errors_are_words_never_bare_numbers(capsys):
    import errno

    def full_disk(argv):
        raise OSError(errno.ENOSPC, "No space left on device")

    def bare(argv):
        raise OSError(errno.ENOENT)
    for main, expected in ((full_disk, "error: no space left on the disk: free some space, then run it again"),
                           (bare, "error: No such file or directory")):
        with pytest.raises(SystemExit) as e:
            distributed.cli(main, [])
        assert str(e.value.code).startswith(expected), e.value.code


WRONG_KIND = [  # a file of another kind where weights are expected: one line naming it, status 1
    ("train", ["--vae", "{notes}"], "{notes} is not a .safetensors weights file"),
    ("train_vae", ["--finetune", "{ckpt}"], "{ckpt} is a torch checkpoint, not CogVideoX's weights"),
    ("evaluate", ["--vae", "{pth}", "--real", "synthetic", "--frames", "8", "--size", "32", "--num-clips", "2"],
     "{pth} is not a train_vae.py checkpoint"),
    ("train", ["--align", "--dino", "{notes}"], "{notes} is not a weight file for DINO"),
    ("train", ["--align", "--dino", "{pickled}"], "{pickled}: refused to load as DINO weights"),
    ("train", ["--align", "--inception", "{pickled}"], "{pickled}: refused to load as Inception-v3 weights"),
    ("train_vae", ["--lpips", "{pickled}", "{pickled}"], "{pickled}: refused to load as LPIPS VGG16 weights"),
    ("evaluate", ["--real", "synthetic", "--fake", "synthetic", "--metrics", "fc", "--clip", "{notes}",
                  "--num-clips", "2", "--frames", "8", "--size", "32"], "{notes} is not a TorchScript CLIP file"),
    ("evaluate", ["--real", "synthetic", "--fake", "synthetic", "--frames", "100000", "--num-clips", "2"],
     "--frames 100000 at stride 3 spans 299998; lower --frames or the stride"),
]


@pytest.mark.parametrize("script, argv, message", WRONG_KIND)
def test_files_of_the_wrong_kind(script, argv, message, files, capsys, tmp_path):
    pickled, pth = str(tmp_path / "pickled.pt"), str(tmp_path / "weights.pth")
    torch.save({"a": Payload(str(tmp_path / "ran"))}, pickled)
    torch.save({"a": torch.ones(2)}, pth)
    names = {**files, "pickled": pickled, "pth": pth}
    base = {"train": TRAIN + ["--vae", files["vae"], "--max-steps", "1", "--out", str(tmp_path / "out")],
            "train_vae": VAE + ["--steps", "1", "--out", str(tmp_path / "out")], "evaluate": []}[script]
    argv = [a.format(**names) for a in argv]
    if script == "train" and "--vae" in argv:
        base = base[:base.index("--vae")] + base[base.index("--vae") + 2:]
    code, line = fails(script, base + argv, capsys)
    assert code == 1 and message.format(**names) in line, line
    assert not os.path.exists(tmp_path / "ran")  # nothing from the file ran


def test_a_torn_last_log_line_is_dropped_and_other_damage_named(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    log = distributed.RunLog(str(tmp_path), 0, resume_step=2)
    log.close()
    assert [r["step"] for r in distributed.read_log(str(path))] == [1, 2]
    path.write_text('{"step": 1, "loss": 0.5}\n{"st\n{"step": 3, "loss": 0.4}\n')
    with pytest.raises(ValueError, match=f"{path} is damaged at line 2"):
        distributed.RunLog(str(tmp_path), 0, resume_step=3)


def test_a_checkpoint_that_cannot_be_renamed_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "reuse.pt"
    folder.mkdir()  # a folder where the file should go
    with pytest.raises(OSError):
        checkpoint.save({"w": torch.ones(2)}, str(folder))
    assert sorted(os.listdir(tmp_path)) == ["reuse.pt"]


def test_mp4_is_the_same_bytes_every_time(tmp_path):
    pytest.importorskip("av")
    torch.manual_seed(0)
    video = torch.rand(3, 9, 32, 32) * 2 - 1
    paths = [str(tmp_path / f"{i}.mp4") for i in range(2)]
    for p in paths:
        assert data.save_mp4(video, p)
    assert open(paths[0], "rb").read() == open(paths[1], "rb").read()


def test_benchmarks_check_their_arguments(files, capsys):
    from experiments import benchmark, curve
    for main, argv, message in (
            (benchmark.main, ["--batch", "0"], "--batch 0: it must be positive"),
            (benchmark.main, ["--repeat", "0"], "--repeat 0: it must be positive"),
            (benchmark.main, ["--size", "5"], "--size 5: it must be a positive multiple of 2"),
            (benchmark.main, ["--train-step", "--json", files["root"]], "give the path of a file to write"),
            (curve.main, ["--model", "XL"], "invalid choice: 'XL'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, err


def test_upgrade_names_a_missing_or_damaged_file_in_one_line(files, tmp_path):
    for path, message in ((str(tmp_path / "none.pt"), "no checkpoint at"), (files["truncated"], "is damaged"),
                          (files["notes"], "is damaged")):
        before = open(path, "rb").read() if os.path.exists(path) else None
        p = subprocess.run([sys.executable, "checkpoint.py", "upgrade", path], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 1 and p.stderr.startswith("error: ") and message in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert (open(path, "rb").read() if os.path.exists(path) else None) == before


def test_a_data_loader_workers_error_is_its_own_last_line(tmp_path, capsys):
    """An error raised in a DataLoader worker reaches the user as its message, not as the worker's traceback."""
    folder = tmp_path / "v0"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:06d}.jpg").write_bytes(b"garbage")

    def read(argv):
        ds = data.FrameFolderClips(str(tmp_path), "all", num_frames=0, num_images=0, stride=1, size=16)
        list(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1))

    with pytest.raises(SystemExit) as e:
        distributed.cli(read, [])
    assert "Original Traceback" not in e.value.code and "File \"" not in e.value.code, e.value.code
    assert e.value.code.startswith("error: 10 clips in a row near index 0") and "000000.jpg" in e.value.code


def test_resume_without_its_log_says_so(tmp_path, capsys):
    log = distributed.RunLog(str(tmp_path), 0, resume_step=7)
    log.file.close()
    assert "log.jsonl is missing; the log goes on from step 7" in capsys.readouterr().out


def test_a_json_report_that_cannot_be_written_leaves_nothing(tmp_path):
    (tmp_path / "report.json").mkdir()  # a folder where the file should go
    with pytest.raises(OSError):
        distributed.write_json(str(tmp_path / "report.json"), {"fvd": 1.0})
    assert os.listdir(tmp_path) == ["report.json"]
    distributed.write_json(str(tmp_path / "ok.json"), {"fvd": 1.0})
    assert open(tmp_path / "ok.json").read() == '{\n "fvd": 1.0\n}'


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a process's state from /proc")
def test_a_killed_prepare_leaves_no_worker_running(tmp_path):
    src, pids = tmp_path / "src", tmp_path / "pids"
    for i in range(2):
        (src / f"v{i}").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(src / f"v{i}" / "000000.jpg")
    pids.mkdir()
    script = f"""
import os, sys, time
sys.path.insert(0, {ROOT!r})
import data
def slow(job):  # a long video: the worker is busy when its parent dies
    open(os.path.join({str(pids)!r}, str(os.getpid())), "w").close()
    time.sleep(120)
if __name__ == "__main__":  # the spawned workers import this file again
    data.prepare_one = slow
    data.prepare({str(src)!r}, {str(tmp_path / "dst")!r}, workers=2)
"""
    (tmp_path / "slow_prepare.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "slow_prepare.py")], stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if len(os.listdir(pids)) == 2:
                break
            time.sleep(0.1)
        workers = [int(p) for p in os.listdir(pids)]
        assert len(workers) == 2
    finally:
        parent.kill()
        parent.wait()

    def running(pid):
        try:
            return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    for _ in range(100):
        if not any(running(pid) for pid in workers):
            break
        time.sleep(0.1)
    assert not any(running(pid) for pid in workers)
