import dataclasses
import os
import sys

import pytest
import torch

# The project is a flat set of modules at the repository root: make them importable from tests/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Without a GPU, Triton's kernels (ssd_triton.py) run in its interpreter, on the CPU. Triton reads this when a
# kernel is defined, so before any test module imports ssm.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny MedSora run folder, trained two steps on 17-frame 64 x 64 clips (5 latent frames of 8 x 8: a 4 x 4
    token grid), for the samplers' tests (test_reuse, test_tradeoff)."""
    import train
    import vae
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_run")
    path = str(root / "vae.pt")
    torch.save({"model": vae.VideoVAE(vae.MODELS["tiny"]).state_dict(),
                "config": dataclasses.asdict(vae.MODELS["tiny"])}, path)
    out = root / "run"
    train.main(["--size", "64", "--num-frames", "16", "--num-images", "1", "--max-clips", "4", "--batch-size", "2",
                "2", "--workers", "0", "--sample-every", "0", "--max-steps", "2", "--vae", path, "--out", str(out)])
    return out
