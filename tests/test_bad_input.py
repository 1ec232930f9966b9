"""Bad input, as a careful user would give it, against the four scripts: each case is one line and a clean exit
(status 2 for a bad argument, checked before any work; 1 for a bad file, with what to do), and nothing on disk
is damaged. The scripts run in-process through distributed.cli, as their `__main__` runs them."""

import os
import subprocess
import sys
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
    ("sample", ["--run", "{root}/none", "--eta", "-1"], "--eta -1.0: it must not be negative"),
    ("sample", ["--run", "{root}/none", "--out", "{notes}"], "--out {notes}: it is a file"),
    ("evaluate", ["--real", "synthetic", "--fake", "{root}", "--frames", "8"], "--frames 8: the I3D network of FVD"),
    ("evaluate", ["--real", "synthetic", "--fake", "{root}", "--num-clips", "1"], "--num-clips 1: the metrics"),
    ("evaluate", ["--real", "synthetic", "--fake", "{root}", "--batch-size", "0"], "--batch-size 0: it must be"),
]


@pytest.mark.parametrize("script, argv, message", ARGUMENTS)
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
                                           ("nan", "the EMA weights hold NaN")])
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

