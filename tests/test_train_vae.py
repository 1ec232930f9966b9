"""train_vae.py: losses and metrics against known answers, exact resume, fine-tuning trains only the compensation."""
import json
import os

import pytest
import torch

import evaluate
import metric_nets
import train_vae
import vae

ARGS = ["--size", "32", "--num-frames", "8", "--batch-size", "2", "--workers", "0", "--log-every", "1",
        "--val-every", "1000", "--val-clips", "1"]


def test_losses_and_metrics():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    noisier = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
    assert vae.focal_frequency_loss(x, x) == 0
    assert 0 < vae.focal_frequency_loss(noisy, x) < vae.focal_frequency_loss(noisier, x)
    assert torch.allclose(vae.ssim(x, x), torch.ones(2))
    assert (vae.ssim(noisier, x) < vae.ssim(noisy, x)).all() and (vae.ssim(noisy, x) < 1).all()
    # PSNR of a known error: a constant offset of 0.2 in [-1, 1] is 0.1 of the [0, 1] range -> 20 dB
    assert torch.allclose(vae.psnr((x * 0.5) + 0.2, x * 0.5), torch.full((2,), 20.0), atol=1e-3)


def test_lpips_loads_strictly_from_files(tmp_path):
    torch.manual_seed(0)
    ref = metric_nets.LPIPS()
    torch.save({f"features.{k}": v for k, v in ref.features.state_dict().items()}, tmp_path / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(ref.CHANNELS)},
               tmp_path / "vgg.pth")
    lpips = metric_nets.LPIPS.from_files(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(x, x), torch.zeros(2)) and (lpips(x, x.flip(-1)) > 0).all()
    with pytest.raises(FileNotFoundError, match="LPIPS weights not found"):
        metric_nets.LPIPS.from_files(str(tmp_path / "missing.pth"), str(tmp_path / "vgg.pth"))
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match="missing keys"):
        metric_nets.LPIPS.from_files(str(tmp_path / "vgg16.pth"), str(tmp_path / "partial.pth"))


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_is_exact(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train_vae.main(ARGS + ["--steps", "4", "--ckpt-every", "100", "--out", straight])
    train_vae.main(ARGS + ["--steps", "2", "--ckpt-every", "100", "--out", split])
    train_vae.main(ARGS + ["--steps", "4", "--ckpt-every", "100", "--out", split, "--resume"])
    a, b = losses(straight), losses(split)
    print("losses straight:", a, "\nlosses with resume:", b)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a == b
    wa = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=False)["model"]
    wb = torch.load(os.path.join(split, "ckpt.pt"), weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ckpt = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=False)
    assert ckpt["config"]["scaling_factor"] != vae.VAEConfig.scaling_factor  # measured on training clips
    assert os.path.exists(os.path.join(straight, "recon.png"))


def test_finetune_trains_only_the_compensation(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    cfg = vae.MODELS["tiny"]
    torch.manual_seed(0)
    base = vae.VideoVAE(vae.VAEConfig(**{**cfg.__dict__, "freq_comp": False}))
    folder = tmp_path / "vae"
    os.makedirs(folder)
    safetensors.save_file(base.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    with open(folder / "config.json", "w") as f:
        json.dump({"block_out_channels": list(cfg.block_out_channels), "latent_channels": cfg.latent_channels,
                   "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_num_groups}, f)
    out = str(tmp_path / "run")
    train_vae.main(ARGS + ["--steps", "2", "--finetune", str(folder), "--lr", "1e-3", "--out", out])
    trained = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["model"]
    for name, value in base.state_dict().items():
        assert torch.equal(trained[name], value), f"{name} of the frozen VAE changed"
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in trained.items()
               if vae.is_freq_comp(k) and k.endswith("conv2.weight"))  # the zero-initialised convs moved


def test_time_budget_no_compensation_and_eval(tmp_path):
    out = str(tmp_path / "plain")
    train_vae.main(ARGS + ["--steps", "50", "--max-minutes", "0", "--no-freq-comp", "--out", out])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ckpt["step"] == 1  # a zero budget stops after the first step, saved as a finished run
    assert ckpt["config"]["freq_comp"] is False and not any(vae.is_freq_comp(k) for k in ckpt["model"])
    report = os.path.join(out, "eval_synthetic.json")
    result = evaluate.main(["--vae", os.path.join(out, "ckpt.pt"), "--real", "synthetic", "--real-split", "val",
                            "--num-clips", "3", "--frames", "8", "--size", "32", "--batch-size", "2",
                            "--workers", "0", "--out", report])
    assert result["clips"] >= 3 and result["freq_comp"] is False
    assert 0 < result["psnr"] < 60 and 0 < result["ssim"] < 1 and result["ffl"] > 0 and result["clips_per_s"] > 0
    assert all(0 < result[f"psnr_{b}"] < 100 for b in ("low", "mid", "high"))  # by band (test_vae checks the sums)
    with open(report) as f:
        assert json.load(f)["psnr"] == result["psnr"]
    assert os.path.exists(os.path.join(out, "eval_synthetic.png"))


def test_the_cpu_demo_preset_and_flags_beside_it():
    demo = train_vae.parse_args(["--preset", "cpu-demo"])
    assert (demo.size, demo.num_frames, demo.steps, demo.lr, list(demo.betas)) == (64, 8, 300, 5e-4, [0.9, 0.99])
    mine = train_vae.parse_args(["--preset", "cpu-demo", "--lr", "1e-4", "--betas", "0.5", "0.9"])
    assert (mine.lr, list(mine.betas), mine.steps) == (1e-4, [0.5, 0.9], 300)  # flags given beside it win
    assert train_vae.parse_args([]).lr is None  # without the preset: the from-scratch / fine-tuning default
