"""diffusion.py against closed-form answers: for Gaussian data the optimal noise predictor is known exactly."""
import math

import numpy as np
import pytest
import torch

from diffusion import Diffusion

MU = torch.tensor([1.0, -0.5, 0.0, 2.0])
SIGMA = torch.tensor([0.5, 1.5, 1.0, 0.2])


def oracle(diffusion):
    """E[epsilon | z_t] when z_0 ~ N(MU, SIGMA^2): z_t is Gaussian, and epsilon is linear in it."""
    def eps(z, t):
        a = torch.from_numpy(diffusion.abar)[t].to(z.dtype)[:, None]
        return (1 - a).sqrt() * (z - a.sqrt() * MU) / (a * SIGMA ** 2 + 1 - a)
    return eps


def test_schedule():
    d = Diffusion()
    assert d.abar.dtype == np.float64
    assert math.isclose(d.betas[0], 1e-4) and math.isclose(d.betas[-1], 0.02)
    assert math.isclose(d.abar[0], 1 - 1e-4) and 3e-5 < d.abar[-1] < 5e-5
    assert list(d.timesteps(4)) == [999, 666, 333, 0]
    assert len(d.timesteps(250)) == 250 and d.timesteps(1000)[0] == 999


def test_q_sample_marginals():
    d = Diffusion()
    x0 = MU.expand(200_000, 4)
    t = torch.full((200_000,), 300)
    z = d.q_sample(x0, t, torch.randn_like(x0))
    a = d.abar[300]
    assert torch.allclose(z.mean(0), math.sqrt(a) * MU, atol=0.01)
    assert torch.allclose(z.std(0), torch.full((4,), math.sqrt(1 - a)), rtol=0.01)


def test_training_loss_of_oracle_is_the_analytic_minimum():
    d = Diffusion()
    x0 = MU + SIGMA * torch.randn(100_000, 4, dtype=torch.float64)
    for step in (10, 500, 990):
        t = torch.full((x0.shape[0],), step)
        mse = d.training_loss(oracle(d), x0, t)[0].mean().item()
        a = d.abar[step]
        # Var(eps | z_t) = 1 - (1 - a) / (a sigma^2 + 1 - a), averaged over the four dimensions
        expected = (1 - (1 - a) / (a * SIGMA.double() ** 2 + 1 - a)).mean().item()
        assert abs(mse - expected) < 0.01 * max(expected, 0.05), (step, mse, expected)
    zero = lambda z, t: torch.zeros_like(z)
    assert abs(d.training_loss(zero, x0)[0].mean().item() - 1) < 0.02  # predicting nothing costs E[eps^2] = 1


@pytest.mark.parametrize("sampler,steps", [("ddim", 250), ("ddim", 1000), ("ddpm", 1000)])
def test_samplers_reproduce_gaussian_data(sampler, steps):
    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    sample = d.ddim_sample if sampler == "ddim" else d.ddpm_sample
    z = sample(oracle(d), (40_000, 4), steps=steps, generator=g).double()
    mean_err, std_err = (z.mean(0) - MU).abs().max().item(), ((z.std(0) - SIGMA) / SIGMA).abs().max().item()
    print(f"{sampler} {steps} steps: max |mean error| {mean_err:.4f}, max relative std error {std_err:.4f}")
    assert mean_err < 0.03 and std_err < 0.04


def test_ddim_error_is_first_order_in_the_step_size():
    """Deterministic DDIM is a first-order ODE solver: halving the step halves the bias (narrowest dimension)."""
    d = Diffusion()
    noise = torch.randn(40_000, 4, generator=torch.Generator().manual_seed(0))
    err = {s: (d.ddim_sample(oracle(d), noise.shape, steps=s, noise=noise).std(0)[3] / SIGMA[3] - 1).abs().item()
           for s in (50, 100, 200)}
    print("DDIM relative std error by steps:", err)
    assert 1.6 < err[50] / err[100] < 2.4 and 1.6 < err[100] / err[200] < 2.4


def test_ddim_is_deterministic_and_eta_adds_noise():
    d = Diffusion()
    noise = torch.randn(100, 4)
    a = d.ddim_sample(oracle(d), (100, 4), steps=20, noise=noise)
    assert torch.equal(a, d.ddim_sample(oracle(d), (100, 4), steps=20, noise=noise))
    b = d.ddim_sample(oracle(d), (100, 4), steps=20, noise=noise, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)


def test_clip_x0_keeps_a_bad_model_in_range_and_leaves_a_good_one_alone():
    d = Diffusion()
    noise = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = d.ddim_sample(oracle(d), noise.shape, steps=50, noise=noise)
    loose = d.ddim_sample(oracle(d), noise.shape, steps=50, noise=noise, clip_x0=50.0)
    assert torch.allclose(exact, loose)  # a bound the data never reaches changes nothing
    biased = lambda x, t: 0.95 * oracle(d)(x, t)  # noqa: E731  (5 % too small: amplified in x_0 near T)
    drift = d.ddim_sample(biased, noise.shape, steps=50, noise=noise)
    held = d.ddim_sample(biased, noise.shape, steps=50, noise=noise, clip_x0=4.0)
    print(f"5 % biased epsilon: max |sample| {drift.abs().max():.2f} unclipped, {held.abs().max():.2f} clipped")
    assert drift.abs().max() > 6 and held.abs().max() <= 4 + 1e-9


def test_ddim_split_at_any_step_is_the_whole_run():
    """start / stop run a slice of the grid: two halves give the same result as the whole, and the callback sees
    each step's latent before and after."""
    d = Diffusion()
    noise = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = d.ddim_sample(oracle(d), noise.shape, steps=20, noise=noise)
    seen = []
    half = d.ddim_sample(oracle(d), noise.shape, steps=20, noise=noise, stop=7,
                         callback=lambda t, x, out, x_next: seen.append((t, x, x_next)))
    assert [t for t, _, _ in seen] == list(d.timesteps(20)[:7])
    assert torch.equal(seen[0][1], noise) and torch.equal(seen[-1][2], half)
    assert all(torch.equal(a[2], b[1]) for a, b in zip(seen, seen[1:]))  # each step starts where the last ended
    assert torch.equal(d.ddim_sample(oracle(d), noise.shape, steps=20, noise=half, start=7), whole)
