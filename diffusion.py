"""
Gaussian diffusion on latents: the forward process, the training loss and two samplers
(paper Sec. 2.1, Eq. 1-2; Sec. 4.1: linear schedule, 1000 steps, epsilon prediction, DDIM sampling).

Forward process (Eq. 1 with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)):
    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) epsilon,     abar_t = prod_{s <= t} (1 - beta_s)
The network epsilon_theta(z_t, t) is trained with || epsilon - epsilon_theta(z_t, t) ||^2.

Samplers, both on any subset of the 1000 training steps ("respacing"):
    ddim_sample   deterministic for eta = 0 (the paper's sampler, 250 steps by default)
    ddpm_sample   ancestral sampling with the posterior variance; all 1000 steps by default
The schedule is computed in float64 and cast only when it meets a tensor.

Dimension names: B batch, then any latent shape, e.g. (F, C, H, W); t diffusion step.
"""

import numpy as np
import torch
from tqdm.auto import tqdm


def linear_betas(num_steps=1000, beta_start=1e-4, beta_end=0.02):
    """DDPM's linear schedule, rescaled so that other step counts keep the same overall noise level."""
    scale = 1000 / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def _eps_of(output):
    """Models may return (epsilon, extras) - e.g. features for the alignment loss."""
    return output[0] if isinstance(output, tuple) else output


class Diffusion:
    def __init__(self, num_steps=1000):
        self.num_steps = num_steps
        self.betas = linear_betas(num_steps)
        self.abar = np.cumprod(1.0 - self.betas)  # float64, (T,)

    def _at(self, values, t, x):
        """values[t] (float64 numpy) as a tensor broadcastable against x: (B, 1, 1, ...)."""
        v = torch.from_numpy(values).to(x.device)[t.to(x.device)].to(x.dtype)
        return v.view(-1, *[1] * (x.dim() - 1))

    def q_sample(self, x0, t, noise):
        """z_t given z_0 (Eq. 1 with s = 0)."""
        return self._at(np.sqrt(self.abar), t, x0) * x0 + self._at(np.sqrt(1 - self.abar), t, x0) * noise

    def training_loss(self, model, x0, t=None, noise=None, **model_kwargs):
        """Per-sample MSE between the true and the predicted noise (B,), and the model's raw output.

        The raw output is returned so that callers can use what else the model gives (the alignment features).
        """
        if t is None:
            t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        output = model(self.q_sample(x0, t, noise), t, **model_kwargs)
        mse = (noise - _eps_of(output).float()).pow(2).flatten(1).mean(dim=1)
        return mse, output

    def timesteps(self, steps):
        """`steps` training steps spread evenly over [0, T-1], largest first."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be in [1, {self.num_steps}], got {steps}")
        return np.unique(np.round(np.linspace(0, self.num_steps - 1, steps)).astype(np.int64))[::-1]

    def _schedule(self, steps, progress, desc, start=0, stop=None):
        """Yield (t, abar_t, abar_prev) along a respaced schedule; abar_prev = 1 on the last step (z_0).
        start, stop: only the steps ts[start:stop] of the grid (timesteps(steps))."""
        ts = self.timesteps(steps)
        abar_prev = np.append(self.abar[ts[1:]], 1.0)  # the next (smaller) step; 1 past the last step
        todo = list(zip(ts, self.abar[ts], abar_prev))[start:stop]
        for t, a, a_prev in tqdm(todo, desc=desc, disable=not progress):
            yield int(t), float(a), float(a_prev)

    @torch.no_grad()
    def ddim_sample(self, model, shape, steps=250, eta=0.0, generator=None, device="cpu", progress=False,
                    noise=None, clip_x0=None, start=0, stop=None, callback=None, **model_kwargs):
        """DDIM (Song et al. 2020): x_T ~ N(0, I), then x_{t'} from the predicted x_0 and epsilon.

        clip_x0: clamp the predicted x_0 to [-clip_x0, clip_x0] and re-derive epsilon from it. At t near T,
        x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) multiplies the error of eps by up to 1 / sqrt(abar_T) ~ 160;
        a model that is not yet well trained then walks off the data range and never returns.
        start, stop: run only the steps ts[start:stop] of the grid ts = timesteps(steps): `noise` is then the
        latent at ts[start], and the result the latent at ts[stop] (z_0 when stop is None). callback(t, x, output,
        x_next) sees every step: the latent before it, the model's raw output and the latent after it (reuse.py).
        """
        x = torch.randn(shape, generator=generator, device=device) if noise is None else noise.to(device)
        for t, a, a_prev in self._schedule(steps, progress, "DDIM", start, stop):
            output = model(x, torch.full((shape[0],), t, device=device), **model_kwargs)
            eps = _eps_of(output).to(x.dtype)
            x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
            if clip_x0 is not None:
                x0 = x0.clamp(-clip_x0, clip_x0)
                eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
            x_next = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
            if sigma > 0:
                x_next = x_next + sigma * torch.randn(shape, generator=generator, device=device)
            if callback is not None:
                callback(t, x, output, x_next)
            x = x_next
        return x

    @torch.no_grad()
    def ddpm_sample(self, model, shape, steps=None, generator=None, device="cpu", progress=False, noise=None,
                    **model_kwargs):
        """Ancestral sampling of p(z_{t'} | z_t) with the posterior variance (beta-tilde) of the respaced chain."""
        x = torch.randn(shape, generator=generator, device=device) if noise is None else noise.to(device)
        for t, a, a_prev in self._schedule(steps or self.num_steps, progress, "DDPM"):
            eps = _eps_of(model(x, torch.full((shape[0],), t, device=device), **model_kwargs)).to(x.dtype)
            beta = 1 - a / a_prev  # beta of this (possibly skipped-over) step
            x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
            # posterior mean of q(z_{t'} | z_t, z_0): a weighted mix of the predicted z_0 and z_t
            x = (a_prev ** 0.5 * beta / (1 - a)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)) * x
            if a_prev < 1:  # no noise on the final step
                var = beta * (1 - a_prev) / (1 - a)
                x = x + var ** 0.5 * torch.randn(shape, generator=generator, device=device)
        return x
