"""reuse.py: motion volumes and warps on known shifts, the motion network learning a translation, Eq. 12's labels,
the reuse sampler (t* = T is plain DDIM exactly; a t* in between runs the base frames alone, then all frames),
the step selector's choice, the block cache, and `reuse.py train` -> `sample.py --reuse` end to end."""

import json
import math
import os

import numpy as np
import pytest
import torch

import cache
import dit
import reuse
import sample
from diffusion import Diffusion

SHIFT = (1, -2)  # tokens: frame j's token (y, x) is frame i's token (y - 1, x + 2)


def shifted(x, n=1):
    """x (..., h, w) moved by n * SHIFT tokens (wrapping round: the whole-grid radius reaches every token)."""
    return torch.roll(x, shifts=(n * SHIFT[0], n * SHIFT[1]), dims=(-2, -1))


def interior(h, w):
    """Token positions whose source, SHIFT back, is on the grid without wrapping: (h, w) bool."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (y - SHIFT[0] >= 0) & (y - SHIFT[0] < h) & (x - SHIFT[1] >= 0) & (x - SHIFT[1] < w)


def test_cosine_volume_recovers_a_known_shift():
    src = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    dst = shifted(src)
    vol = reuse.cosine_volume(src, dst, radius=3)  # (2, 49, 8, 8)
    best = reuse.offsets(3)[vol.argmax(1)]  # (2, 8, 8, 2): the offset into src of each dst token
    inside = interior(8, 8)
    assert (best[:, inside] == torch.tensor([-SHIFT[0], -SHIFT[1]])).all()
    assert torch.allclose(vol.amax(1)[:, inside], torch.ones(()))  # the match is the same vector: cosine 1
    valid = reuse.valid_offsets(8, 8, 3, "cpu")
    assert valid[:, 0, 0].sum() == 16 and valid[:, 4, 4].sum() == 49  # a corner sees a quarter of the window


def test_warp_moves_a_translated_latent():
    p = 2
    z_i = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))  # (B, C, H, W) latents
    z_j = torch.roll(z_i, shifts=(p * SHIFT[0], p * SHIFT[1]), dims=(2, 3))  # one token = p latent pixels
    tok_i, tok_j = reuse.to_tokens(z_i, p), reuse.to_tokens(z_j, p)  # (1, 64, 8, 8)
    radius = 7  # the whole 8 x 8 grid: wrapped tokens are in reach too
    probs = torch.softmax(200 * reuse.cosine_volume(tok_i, tok_j, radius), 1)
    moved = reuse.from_tokens(reuse.warp(tok_i, probs, radius), p)
    err = (moved - z_j).abs().max().item()
    print(f"latent moved by its own correspondence: max |error| {err:.2e}")
    assert err < 1e-4


def make_cfg(**kw):
    base = dict(blocks=(0, 1), width=32, grid=(8, 8), patch_size=2, probes=(999, 666, 333, 99), hidden=32,
                feat_dim=16)
    return reuse.ReuseConfig(**{**base, **kw})


def translation_trajectories(cfg, n_videos=8, f=4, seed=0):
    """collect()'s layout for clips whose every latent frame is the one before it moved by SHIFT, features too."""
    g = torch.Generator().manual_seed(seed)
    P, (h, w), D, k = len(cfg.probes), cfg.grid, cfg.width, len(cfg.blocks)

    def clip(first, step=1):  # (N, P, f, ...): frame n is frame 0 moved by n * SHIFT, in units of `step`
        return torch.stack([torch.roll(first, (n * step * SHIFT[0], n * step * SHIFT[1]), (-2, -1))
                            for n in range(f)], 2)
    p = cfg.patch_size
    z = clip(torch.randn(n_videos, P, 16, h * p, w * p, generator=g), step=p)  # a token is p x p latent pixels
    dz = clip(0.1 * torch.randn(n_videos, P, 16, h * p, w * p, generator=g), step=p)
    feats = clip(torch.randn(n_videos, P, k, D, h, w, generator=g))  # (N, P, f, k, D, h, w)
    feats = feats.flatten(-2).transpose(-1, -2)  # (N, P, f, k, L, D)
    R = cfg.base_frames  # the base frames run alone move the same way here
    return {"z": z, "dz": dz, "feats": feats, "base_z": z[:, :, :R], "base_dz": dz[:, :, :R],
            "base_feats": feats[:, :, :R]}


def test_motion_network_learns_a_translation_and_predicts_it_onwards():
    torch.manual_seed(0)
    cfg = make_cfg(grid=(6, 6))
    data = translation_trajectories(cfg, n_videos=4)
    mtn = reuse.MotionNet(cfg)
    opt = torch.optim.Adam(mtn.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        loss, terms = reuse.motion_loss(mtn, data, generator=gen)
        first = first or terms
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("Eq. 6 / 8 / 10 terms, first and last:", first, terms)
    assert terms["eq6"] < 0.2 * first["eq6"] and terms["eq8"] < 0.2 * first["eq8"]
    assert terms["eq10"] < 0.5 * first["eq10"]  # the ConvLSTM learnt that the motion goes on the same way
    # frames 2 and 3 estimated from the base frames 0 and 1 at each t*, where their content came from inside the
    # grid (rolled-in tokens come from the far side: no local motion predicts them)
    z = data["z"]
    one = interior(6, 6)  # frame 2: one move from frame 1
    two = one & torch.roll(one, SHIFT, (0, 1))  # frame 3: two moves
    masks = [m.repeat_interleave(2, 0).repeat_interleave(2, 1) for m in (one, two)]  # tokens -> latent pixels
    assert one.sum() == 20 and two.sum() == 8
    with torch.no_grad():
        logits = reuse.pair_logits(mtn.eval(), data["base_feats"])
        for k in range(1, len(cfg.probes)):
            base = mtn.surrogate(logits[:, :, :1], torch.full((4,), k))
            estimate = mtn.extend(z[:, k, :2], list(base.unbind(1)), 4)
            for n, mask in zip((2, 3), masks):
                err = (estimate[:, n] - z[:, k, n]).abs()[..., mask].mean()
                still = (z[:, k, 1] - z[:, k, n]).abs()[..., mask].mean()  # estimating by copying frame 1
                print(f"probe {k}, frame {n}: error {err:.4f}, copying frame 1 {still:.4f}")
                assert err < 0.05 * still


def test_transition_labels_follow_eq_12():
    cfg = make_cfg(beta=1.0)
    errors = torch.tensor([[1.0, 0.5, 0.3, 0.9],   # log(t) * L: 6.91, 3.25, 1.74, 4.14 -> probe 2
                           [1.0, 0.2, 0.9, 1.0],   # 6.91, 1.30, 5.23, 4.60 -> probe 1
                           [0.0, 0.9, 0.9, 0.1]])  # probe 0 (T: no reuse) is never a t*, whatever its error -> 3
    assert reuse.transition_labels(errors, cfg).tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match="beta \\* t > 1"):
        make_cfg(beta=0.005)  # log(beta t) < 0 at t = 99 would turn Eq. 12's minimum into a maximum


def tiny_medsora(seed=0):
    """A tiny MedSora with every weight perturbed (adaLN-Zero would otherwise make it predict zero noise)."""
    torch.manual_seed(seed)
    model = dit.MedSora(dit.make_config("tiny", depth=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def eps_of(model):
    def eps(x, t, **kw):
        out = model(x, t, **kw)
        return (out[0], out[1]) if isinstance(out, tuple) else out
    return eps


def reuse_nets(model, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = make_cfg(width=model.cfg.width, **kw)
    return reuse.MotionNet(cfg).eval(), reuse.StepSelector(cfg).eval()


def test_transition_at_T_is_plain_ddim_exactly():
    model = tiny_medsora()
    noise = torch.randn(2, 5, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    plain = Diffusion().ddim_sample(eps_of(model), noise.shape, steps=12, noise=noise, num_frames=5)
    sampler = reuse.ReuseSampler(*reuse_nets(model), t_star=999)
    assert torch.equal(sampler(eps_of(model), noise, 12, "cpu"), plain)
    assert [s["frame_steps"] for s in sampler.stats] == [60, 60]
    two = noise[:, :2]  # no more frames than the base frames: nothing to estimate, plain DDIM
    sampler = reuse.ReuseSampler(*reuse_nets(model), t_star=300)
    assert torch.equal(sampler(eps_of(model), two, 12, "cpu"),
                       Diffusion().ddim_sample(eps_of(model), two.shape, steps=12, noise=two, num_frames=2))


def test_a_transition_in_between_runs_the_base_frames_alone_then_all_frames():
    model = tiny_medsora()
    mtn, dss = reuse_nets(model)
    d, steps, f, R = Diffusion(), 12, 5, 2
    noise = torch.randn(2, f, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    ts = d.timesteps(steps)
    grid = reuse.probe_grid(mtn.cfg.probes, ts)  # probe 333 -> the first grid step at or below it
    assert ts[grid[2]] <= 333 < ts[grid[2] - 1]
    seen = {}
    extend = mtn.extend
    mtn.extend = lambda z_base, pairs, f: seen.setdefault("z", extend(z_base, pairs, f))
    sampler = reuse.ReuseSampler(mtn, dss, t_star=400)  # rounded down to the probe 333
    out = sampler(eps_of(model), noise, steps, "cpu")
    # the base frames at t* are those of a 2-frame run of the same noise, stopped at t*'s grid step
    base = d.ddim_sample(eps_of(model), (2, R, 16, 16, 16), steps=steps, noise=noise[:, :R], stop=grid[2],
                         num_frames=R)
    assert torch.allclose(seen["z"][:, :R], base, atol=1e-6)
    assert not torch.allclose(seen["z"][:, R:], noise[:, R:])  # the later frames were estimated, not noise
    # then all frames from t* on, as plain DDIM would from that latent
    rest = d.ddim_sample(eps_of(model), seen["z"].shape, steps=steps, noise=seen["z"], start=grid[2], num_frames=f)
    assert torch.equal(out, rest)
    cost = R * (grid[2] + 1) + f * (steps - grid[2])
    assert sampler.stats == [{"t_star": int(ts[grid[2]]), "frame_steps": cost, "plain_frame_steps": f * steps}] * 2


def test_the_step_selector_chooses_a_probe_on_the_grid():
    model = tiny_medsora()
    d, steps = Diffusion(), 12
    noise = torch.randn(3, 5, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    ts = d.timesteps(steps)
    for seed in range(3):  # three random selectors: whatever they choose must be a probe's grid step, never T
        mtn, dss = reuse_nets(model, seed)
        logits = dss(torch.randn(4, 4, mtn.cfg.K, 8, 8), torch.tensor([2, 3, 4, 4]))
        assert logits[:, 0].eq(-math.inf).all() and torch.isfinite(logits[:, 1:]).all()
        sampler = reuse.ReuseSampler(mtn, dss)
        out = sampler(eps_of(model), noise, steps, "cpu")
        allowed = {int(ts[g]) for g in reuse.probe_grid(sampler.cfg.probes, ts)[1:]}
        assert len(sampler.stats) == 3 and all(s["t_star"] in allowed for s in sampler.stats)
        assert torch.isfinite(out).all() and out.shape == noise.shape


class ScriptedSelector(torch.nn.Module):
    """A step selector that picks, at each probe k, the t* probes listed for the videos still undecided."""

    def __init__(self, picks):
        super().__init__()
        self.picks, self.calls = picks, []

    def forward(self, motion, seen):
        k = int(seen[0]) - 1
        self.calls.append((k, len(motion)))
        return torch.nn.functional.one_hot(torch.tensor(self.picks[k]), motion.shape[1]).float()


def test_videos_of_one_batch_may_take_different_transition_steps():
    model = tiny_medsora()
    mtn, _ = reuse_nets(model)
    d, steps, f, R = Diffusion(), 12, 5, 2
    noise = torch.randn(2, f, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    ts = d.timesteps(steps)
    grid = reuse.probe_grid(mtn.cfg.probes, ts)
    # probe 1: video 0 takes probe 1, video 1 waits; probes 2 and 3: video 1 takes probe 3 once it has seen it
    selector = ScriptedSelector({1: [1, 3], 2: [3], 3: [3]})
    sampler = reuse.ReuseSampler(mtn, selector)
    both = sampler(eps_of(model), noise, steps, "cpu")
    assert selector.calls == [(1, 2), (2, 1), (3, 1)]  # the decided video left the base run
    for i, probe in ((0, 1), (1, 3)):
        alone = reuse.ReuseSampler(mtn, None, t_star=mtn.cfg.probes[probe])(eps_of(model), noise[i:i + 1], steps,
                                                                           "cpu")
        assert torch.allclose(both[i:i + 1], alone, rtol=1e-5, atol=1e-4), (i, (both[i:i + 1] - alone).abs().max())
    assert sampler.stats == [{"t_star": int(ts[grid[p]]), "frame_steps": R * (grid[p] + 1) + f * (steps - grid[p]),
                              "plain_frame_steps": f * steps} for p in (1, 3)]  # in video order


def test_too_few_steps_for_the_probes_are_refused():
    with pytest.raises(ValueError, match="3 DDIM steps are too few for the 4 probes"):
        reuse.probe_grid((999, 666, 333, 99), Diffusion().timesteps(3))


def test_block_cache_threshold_zero_is_plain_and_a_large_one_runs_the_first_step_only():
    model = tiny_medsora()
    noise = torch.randn(1, 5, 16, 16, 16, generator=torch.Generator().manual_seed(6))
    plain = Diffusion().ddim_sample(eps_of(model), noise.shape, steps=6, noise=noise, num_frames=5)
    with cache.BlockCache(model, 0.0) as blocks:
        again = Diffusion().ddim_sample(eps_of(model), noise.shape, steps=6, noise=noise, num_frames=5)
    assert torch.equal(again, plain) and blocks.counts == {"run": 12, "reused": 0}
    assert all(isinstance(b, dit.MedSoraBlock) for b in model.blocks)  # put back
    with cache.BlockCache(model, 1e9) as blocks:
        lazy = Diffusion().ddim_sample(eps_of(model), noise.shape, steps=6, noise=noise, num_frames=5)
    assert blocks.counts == {"run": 2, "reused": 10} and not torch.equal(lazy, plain)
    with cache.BlockCache(model, 0.3) as blocks:
        Diffusion().ddim_sample(eps_of(model), noise.shape, steps=6, noise=noise, num_frames=5)
    print("threshold 0.3:", blocks.counts)
    assert 2 < blocks.counts["run"] < 12


def test_block_cache_decides_per_video():
    """A video's result must not depend on the other videos of its batch."""
    model = tiny_medsora()
    noise = torch.randn(2, 5, 16, 16, 16, generator=torch.Generator().manual_seed(8))
    noise[1] *= 3  # a very different neighbour
    runs = {}
    for name, x in (("alone", noise[:1]), ("batched", noise)):
        with cache.BlockCache(model, 0.3) as blocks:
            runs[name] = Diffusion().ddim_sample(eps_of(model), x.shape, steps=10, noise=x, num_frames=5)
        runs[name + " counts"] = dict(blocks.counts)
    print(runs["alone counts"], runs["batched counts"])
    assert 0 < runs["alone counts"]["reused"] and runs["batched counts"]["run"] > runs["alone counts"]["run"]
    assert torch.allclose(runs["batched"][:1], runs["alone"], rtol=1e-5, atol=1e-4)


def test_train_then_sample_with_reuse_and_with_the_cache(tiny_run, tmp_path, monkeypatch, capsys):
    path = reuse.main(["train", "--run", str(tiny_run), "--videos", "4", "--val-videos", "2", "--steps", "20",
                       "--iters", "3", "--dss-iters", "3", "--batch-size", "2", "--probes", "5"])
    assert path == str(tiny_run / "reuse" / "reuse.pt") and os.path.exists(path)
    mtn, dss, state = reuse.load(path)
    assert mtn.cfg.probes == (999, 774, 549, 324, 99) and mtn.cfg.grid == (4, 4) and state["ckpt_step"] == 2
    assert len(state["summary"]["labels"]) == 5 and sum(state["summary"]["labels"]) == 2

    common = ["--run", str(tiny_run), "--num-videos", "2", "--steps", "20", "--batch-size", "2"]
    calls, generate = [], sample.pipeline.generate
    monkeypatch.setattr(sample.pipeline, "generate", lambda *a, **k: calls.append(k.get("sampler")) or generate(*a, **k))
    for extra in (["--reuse", path], ["--reuse", path, "--reuse-t", "500"], ["--cache-threshold", "0.2"]):
        out = str(tmp_path / "_".join(e.strip("-") for e in extra[::2]))
        calls.clear()
        sample.main(common + ["--out", out] + extra)
        # the batch with the faster sampler, then plain DDIM on the same videos for the speed-up
        assert len(calls) == 2 and calls[1] is None and (calls[0] is not None) == ("--reuse" in extra)
        assert "plain DDIM" in capsys.readouterr().out
        assert len(os.listdir(os.path.join(out, "frames", "000001"))) == 17
        speed = json.load(open(os.path.join(out, "speed.json")))
        print(extra[::2], speed)
        assert speed["videos"] == 2 and speed["plain_batch_videos"] == 2
        assert speed["speedup"] == speed["plain_batch_seconds"] / speed["batch_seconds"] > 0
        if "--reuse-t" in extra:  # 500 -> probe 324 -> grid step 13 (t 315): 2 frames for 14 steps, 5 for 7
            assert speed["t_star"] == [315, 315] and speed["frame_steps_ratio"] == (2 * 14 + 5 * 7) / (5 * 20)
        elif "--reuse" in extra:  # the selector: some probe after T, on the grid of 20 steps
            assert len(speed["t_star"]) == 2 and all(t < 999 for t in speed["t_star"])
        else:
            assert speed["run"] + speed["reused"] == 2 * 2 * 20  # 2 videos, 2 blocks, 20 steps
    # a longer video than the model was trained on: 33 frames, 9 latent frames, 7 of them estimated
    out = str(tmp_path / "long")
    calls.clear()
    sample.main(common + ["--out", out, "--reuse", path, "--reuse-t", "300", "--num-frames", "32", "--no-plain-timing"])
    assert len(calls) == 1 and "speedup" not in json.load(open(os.path.join(out, "speed.json")))
    assert len(os.listdir(os.path.join(out, "frames", "000000"))) == 33
    assert json.load(open(os.path.join(out, "speed.json")))["frame_steps_ratio"] < 0.8
    with pytest.raises(ValueError, match=r"other settings \(reuse_t: 300 -> 500\)"):
        sample.main(common + ["--out", out, "--reuse", path, "--reuse-t", "500", "--num-frames", "32"])


@pytest.mark.parametrize("extra, message", [
    (["--reuse-t", "500"], "--reuse-t needs --reuse FILE"),
    (["--reuse", "r.pt", "--cache-threshold", "0.1"], "choose one"),
    (["--reuse", "r.pt", "--eta", "0.5"], "--reuse needs deterministic DDIM"),
    (["--num-frames", "12"], "--num-frames 12: it must be a positive multiple of 8"),
])
def test_bad_sampling_options_exit_2(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(extra)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_reuse_files_are_checked(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no denoising-reuse networks"):
        reuse.load(str(tmp_path / "missing.pt"))
    other = str(tmp_path / "other.pt")
    torch.save({"model": {}}, other)
    with pytest.raises(ValueError, match="not a reuse.py train file"):
        reuse.load(other)
    tiny = dit.make_config("tiny")
    reuse.check_model(make_cfg(width=128), tiny, (8, 8), other)  # the same architecture and grid: accepted
    with pytest.raises(ValueError, match="trained on a MedSora of width 512"):
        reuse.check_model(make_cfg(width=512), tiny, (8, 8), other)
    with pytest.raises(ValueError, match=r"token grid \(8, 8\).*grid \(4, 4\)"):
        reuse.check_model(make_cfg(width=128), tiny, (4, 4), other)
    with pytest.raises(ValueError, match="depth 2"):
        reuse.check_model(make_cfg(width=128, blocks=(0, 5)), tiny, (8, 8), other)


@pytest.mark.parametrize("extra, message", [
    (["--probes", "1"], "at least 2 probes"),
    (["--base-frames", "1"], "2 base frames"),
    (["--radius", "-3"], "a radius of -1"),
    (["--blocks", "-1"], "--blocks -1: it must not be negative"),
    (["--steps", "5"], "--steps 5: 5 DDIM steps are too few for the 10 probes"),
])
def test_bad_reuse_training_options_exit_2(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        reuse.main(["train", *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_reuse_networks_are_not_written_beside_the_checkpoint(tiny_run):
    with pytest.raises(ValueError, match="not beside the checkpoint"):
        reuse.main(["train", "--run", str(tiny_run), "--out", str(tiny_run / "nets.pt"), "--videos", "1",
                    "--val-videos", "1", "--steps", "20"])
