"""Discrete DDPM with the variance-preserving beta schedule used by FISOR (T = 5).

Schedule (t = 1..T, beta_min = 0.1, beta_max = 10):
    alpha_t = exp(-beta_min / T - (beta_max - beta_min) (2t - 1) / (2 T^2)),  beta_t = 1 - alpha_t,
    alpha_bar_t = prod_{i<=t} alpha_i.
Forward noising:  a_t = sqrt(alpha_bar_t) a_0 + sqrt(1 - alpha_bar_t) eps.
Reverse step:     a_{t-1} = (a_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t) + sqrt(beta_t) z,
                  (no noise at the last step), clipped to [-1, 1] after every step.
Indices below are 0-based: index k stands for t = k + 1.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def vp_beta_schedule(num_steps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> torch.Tensor:
    t = torch.arange(1, num_steps + 1, dtype=torch.float64)
    alphas = torch.exp(-beta_min / num_steps - 0.5 * (beta_max - beta_min) * (2 * t - 1) / num_steps**2)
    return (1 - alphas).float()


class DDPMSchedule(nn.Module):
    """Buffers of the schedule plus forward noising and ancestral sampling."""

    def __init__(self, num_steps: int = 5, clip: float = 1.0):
        super().__init__()
        self.num_steps = num_steps
        self.clip = clip
        betas = vp_beta_schedule(num_steps)
        alphas = 1 - betas
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas", alphas, persistent=False)
        self.register_buffer("alpha_bars", torch.cumprod(alphas, 0), persistent=False)
        # per index k: (beta_k / sqrt(1 - alpha_bar_k), sqrt(alpha_k), sqrt(beta_k)), computed in float32 and kept as
        # Python numbers (exact): a reverse step then launches no scalar tensor ops (indexing, sqrt, division)
        self.reverse_coefficients: list[tuple[float, float, float]] = list(zip(
            (betas / (1 - self.alpha_bars).sqrt()).tolist(), alphas.sqrt().tolist(), betas.sqrt().tolist()))

    def add_noise(self, actions: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """a_k = sqrt(alpha_bar_k) a_0 + sqrt(1 - alpha_bar_k) eps for per-row step indices k."""
        ab = self.alpha_bars[k].unsqueeze(-1)
        return ab.sqrt() * actions + (1 - ab).sqrt() * noise

    def reverse_step(self, x: torch.Tensor, k: int, eps: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """One ancestral step from index k to k - 1; `noise` is ignored at k = 0."""
        eps_scale, alpha_sqrt, noise_scale = self.reverse_coefficients[k]
        x = (x - eps_scale * eps) / alpha_sqrt
        if k > 0 and noise is not None:
            x = x + noise_scale * noise
        return x.clamp(-self.clip, self.clip)

    def sample(self, eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
               device: torch.device, dtype: torch.dtype = torch.float32,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw samples of `shape` by ancestral sampling; eps_fn(x, k_batch) predicts the noise."""
        x = torch.randn(shape, device=device, dtype=dtype, generator=generator)
        for k in reversed(range(self.num_steps)):
            k_batch = torch.full((shape[0],), k, device=device, dtype=dtype)
            noise = torch.randn(shape, device=device, dtype=dtype, generator=generator) if k > 0 else None
            x = self.reverse_step(x, k, eps_fn(x, k_batch), noise)
        return x
