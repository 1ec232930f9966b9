"""The project's shape: no script or experiment imports a script; the experiments run from the root as modules;
the trainers stay short enough to read top to bottom."""
import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train", "train_vae", "sample", "evaluate"}
EXPERIMENTS = {"benchmark", "throughput", "curve", "tradeoff", "vae_speed"}


def imported(path):
    """Every module name a file imports, at any depth (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_file_imports_a_script_or_an_experiment():
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "experiments", "*.py"))
    bad = {}
    for path in files:
        names = imported(path)
        hits = (names & SCRIPTS) | {n for n in names if n.split(".")[-1] in EXPERIMENTS and n.startswith("experiments")}
        if hits:
            bad[os.path.relpath(path, ROOT)] = sorted(hits)
    assert not bad, bad


def test_trainers_read_top_to_bottom():
    for name in ("train.py", "train_vae.py"):
        src = open(os.path.join(ROOT, name)).read()
        assert len(src.splitlines()) <= 400, name
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "experiments", "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 80, f"{os.path.relpath(path, ROOT)}: {node.name}"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS) + ["peer"])
def test_experiments_run_from_the_root_as_modules(name):
    done = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    if name == "peer":  # no options: it prints the parameter counts
        assert done.returncode == 0 and "MedSora-B" in done.stdout, done.stderr
    else:
        assert done.returncode == 0 and "usage" in done.stdout, done.stderr


def test_readme_stays_a_page():
    assert len(open(os.path.join(ROOT, "README.md")).read().splitlines()) <= 250
