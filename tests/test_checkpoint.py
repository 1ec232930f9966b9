"""checkpoint.py: RNG states survive weights-only loading, crafted and damaged files are refused and named;
the latent cache's damage is named; the trainers' train_step functions called directly."""
import os
import random

import numpy as np
import pytest
import torch

import checkpoint
import dit
import latents
import train
import train_vae
import vae
from diffusion import Diffusion


class Payload:
    """Unpickling this object calls os.mkdir(path): what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    np.random.randn()  # leaves a cached Gaussian in NumPy's state, which must come back too
    checkpoint.save({"rng": checkpoint.rng_state()}, str(tmp_path / "c.pt"))
    expected = draws() + (float(np.random.randn()),)
    draws()
    checkpoint.set_rng_state(checkpoint.load(str(tmp_path / "c.pt"))["rng"])
    assert draws() + (float(np.random.randn()),) == expected
    assert not os.path.exists(str(tmp_path / "c.pt.tmp"))


def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path):
    marker, path = str(tmp_path / "ran"), str(tmp_path / "evil.pt")
    torch.save({"model": {}, "config": {}, "extra": Payload(marker)}, path)
    for load in (checkpoint.load, vae.load):
        with pytest.raises(ValueError, match="refused to load") as e:
            load(path)
        assert path in str(e.value)
    assert not os.path.exists(marker)
    torch.load(path, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert os.path.isdir(marker)


def test_damaged_checkpoints_are_named(tmp_path):
    good = str(tmp_path / "good.pt")
    checkpoint.save({"w": torch.randn(256, 256), "step": 3}, good)
    raw = open(good, "rb").read()
    cut, flipped = str(tmp_path / "cut.pt"), str(tmp_path / "flipped.pt")
    open(cut, "wb").write(raw[:len(raw) // 2])
    middle = bytearray(raw)
    middle[len(raw) // 2] ^= 0xFF  # inside the tensor's bytes: torch.load alone would return wrong weights
    open(flipped, "wb").write(bytes(middle))
    with pytest.raises(ValueError, match="cut.pt is damaged"):
        checkpoint.load(cut)
    with pytest.raises(ValueError, match="flipped.pt is damaged: its part .* fails its checksum"):
        checkpoint.load(flipped)
    assert checkpoint.load(good)["step"] == 3
    with pytest.raises(SystemExit, match="does not exist"):
        checkpoint.resume(str(tmp_path / "nothing"), None, ())


def test_damaged_latent_cache_is_named(tmp_path):
    folder = str(tmp_path / "latents")
    os.makedirs(folder)
    shard = {"indices": torch.arange(4), **{k: torch.randn(4, 2, 3, 16, 2, 2).half() for k in latents.CachedLatents.KEYS}}
    checkpoint.save(shard, os.path.join(folder, "shard0of1.pt"))
    meta = {"key": "k", "shards": ["shard0of1.pt"], "clips": 4}
    assert latents.load_cache(folder, meta)["video_mean"].shape == (4, 2, 3, 16, 2, 2)
    with pytest.raises(ValueError, match="not each of the 5"):
        latents.load_cache(folder, {**meta, "clips": 5})
    open(os.path.join(folder, "shard0of1.pt"), "r+b").truncate(1000)
    with pytest.raises(ValueError, match="shard0of1.pt is damaged"):
        latents.load_cache(folder, meta)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        f.write('{"key": "k", "sha')  # cut off
    with pytest.raises(ValueError, match="meta.json is damaged"):
        latents.build_cache(None, None, folder, "k", 0, 1, "cpu", False, 1, 0, print)


def latent_batch(B=2, f=3, n=1, C=16, h=4):
    g = torch.Generator().manual_seed(0)
    moments = lambda k: torch.randn(B, k, C, h, h, generator=g)  # noqa: E731
    return {"video_mean": moments(f), "video_logvar": moments(f) - 4, "image_mean": moments(n),
            "image_logvar": moments(n) - 4}


def test_train_step_updates_and_skips_a_non_finite_loss():
    torch.manual_seed(0)
    model = dit.MedSora(dit.make_config("tiny", in_channels=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    kw = dict(scale=1.0, num_frames=3, max_norm=1.0, world=1, device=torch.device("cpu"), amp=False)
    loss, aligned, grad_norm, updated = train.train_step(model, opt, latent_batch(), Diffusion(), **kw)
    assert updated and torch.isfinite(loss) and 0 < grad_norm and aligned is None
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    class NaNDiffusion(Diffusion):
        def training_loss(self, *a, **k):
            mse, out = super().training_loss(*a, **k)
            return mse * float("nan"), out
    after = [p.detach().clone() for p in model.parameters()]
    loss, _, _, updated = train.train_step(model, opt, latent_batch(), NaNDiffusion(), **kw)
    assert not updated and not torch.isfinite(loss)
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))  # skipped: the weights are kept


def test_vae_train_step_with_the_discriminator():
    torch.manual_seed(0)
    model = vae.VideoVAE(vae.MODELS["tiny"])
    args = train_vae.parse_args(["--disc-start", "0"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    disc = train_vae.PatchDiscriminator()
    disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-4)
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    d_before = [p.detach().clone() for p in disc.parameters()]
    losses = train_vae.train_step(model, opt, x, args, 0, disc=disc, disc_opt=disc_opt)
    assert set(losses) == {"loss", "l1", "ffl", "kl", "gen", "disc"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.requires_grad for p in disc.parameters())  # frozen only for the generator's term
    # the discriminator took one Adam step: every weight moved by at most lr
    moved = max(float((a - p.detach()).abs().max()) for a, p in zip(d_before, disc.parameters()))
    assert 0 < moved <= 1.01e-4
    with pytest.raises(SystemExit, match="loss is nan"):
        train_vae.train_step(model, opt, x * float("nan"), args, 1)


def test_upgrade_rewrites_an_earlier_checkpoint(tmp_path):
    path = str(tmp_path / "old.pt")
    old_rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"model": {"w": torch.ones(2)}, "rng": [old_rng]}, path)  # as versions before this one wrote them
    with pytest.raises(ValueError, match="checkpoint.py upgrade"):
        checkpoint.load(path)
    checkpoint.upgrade(path)
    expected = draws()
    checkpoint.set_rng_state(checkpoint.load(path)["rng"][0])
    assert draws() == expected and torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(2))
