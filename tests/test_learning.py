"""The tiny model learns what sampling needs: checks that would have caught the width-64 bug.

A width-64 tiny model (one flattened 2 x 2 x 16 patch) could not represent a token's own mean and scale
after the final per-token norm; its epsilon error near t = T had a floor of ~0.036 per element, and DDIM
multiplied it into samples of std ~25. Here the tiny configuration is fitted to 8 fixed latents with
distinct per-channel means and spreads, and its samples must have the data's statistics.
"""
import pytest
import torch

import dit
from diffusion import Diffusion

C, F, H = 16, 2, 4  # latent channels (as the VAE's), frames, latent height = width
MEAN = torch.linspace(-1, 1, C).view(1, 1, C, 1, 1)
STD = torch.linspace(0.3, 1.0, C).view(1, 1, C, 1, 1)


@pytest.fixture(scope="module")
def fitted():
    data = MEAN + STD * torch.randn(8, F, C, H, H, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = dit.MedSora(dit.make_config("tiny", in_channels=C, attn_dropout=0.0))
    opt, diffusion = torch.optim.AdamW(model.parameters(), 1e-3), Diffusion()
    for _ in range(1200):
        loss, _ = diffusion.training_loss(model, data[torch.randint(0, 8, (32,))])
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    return model.eval(), diffusion, data


def per_channel(x):
    return x.mean((0, 1, 3, 4)), x.std((0, 1, 3, 4))


def test_width_that_cannot_hold_a_patch_is_refused():
    with pytest.raises(ValueError, match="width 64 cannot represent a 2x2x16 patch"):
        dit.MedSora(dit.make_config("tiny", width=64, headdim=16))
    dit.check_width(dit.make_config("tiny", in_channels=16))  # the shipped sizes pass
    dit.check_width(dit.make_config("S", in_channels=16))


@torch.no_grad()
def test_noise_prediction_near_T_is_accurate(fitted):
    """At t = T the answer is almost the input: the width-64 floor was 0.036, a scale-blind model's 0.0078."""
    model, diffusion, data = fitted
    errors = []
    for t in (999, 950):
        noise = torch.randn((64, F, C, H, H), generator=torch.Generator().manual_seed(t))
        x0 = data[torch.arange(64) % 8]
        steps = torch.full((64,), t)
        errors.append(float((model(diffusion.q_sample(x0, steps, noise), steps) - noise).pow(2).mean()))
    print("epsilon MSE at t = 999, 950:", errors)
    assert max(errors) < 0.004


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@torch.no_grad()
def test_samples_have_the_data_statistics(fitted, sampler):
    model, diffusion, data = fitted
    gen = torch.Generator().manual_seed(3)
    shape = (48, F, C, H, H)
    x = (diffusion.ddim_sample(model, shape, steps=25, generator=gen) if sampler == "ddim"
         else diffusion.ddpm_sample(model, shape, steps=100, generator=gen))
    (gm, gs), (dm, ds) = per_channel(x), per_channel(data)
    print(f"{sampler}: max |mean - data| {float((gm - dm).abs().max()):.3f}, std / data std "
          f"{float((gs / ds).min()):.2f}..{float((gs / ds).max()):.2f}")
    assert float((gm - dm).abs().max()) < 0.25  # data means span -1..1
    assert 0.6 < float((gs / ds).min()) and float((gs / ds).max()) < 1.6  # data stds span 0.3..1
