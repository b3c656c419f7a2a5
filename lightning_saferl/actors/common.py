"""Parts shared by the transition baselines BCQ-Lag, CPQ and COptiDICE: the Q threshold of an episode cost limit
(`cost_threshold`, `CostLimitedModule`), `frozen_call` (a critic term whose gradient reaches only the actions) and
the conditional VAE of dataset actions (`ActionVAE`, BCQ's and CPQ's)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_saferl.base import SafeRLModule
from lightning_saferl.errors import InputError
from lightning_saferl.nets import MLP


def cost_threshold(cost_limit: float, discount: float, horizon: int) -> float:
    """Per-step Q threshold of an episode cost limit (OSRL's qc_thres): limit (1 - gamma^T) / ((1 - gamma) T)."""
    if horizon <= 0:
        raise InputError(f"episode length T must be > 0, got {horizon}")
    if discount == 1.0:
        return float(cost_limit)
    return cost_limit * (1.0 - discount ** horizon) / ((1.0 - discount) * horizon)


def episode_steps(module: SafeRLModule, given: Optional[int]) -> int:
    """T: `given`, else the attached datamodule's `max_episode_steps`."""
    if given is not None:
        return int(given)
    datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    horizon = getattr(datamodule, "max_episode_steps", None)
    if horizon is None:
        raise InputError(f"{type(module).__name__}: episode length unknown; pass max_episode_steps=T or fit with an "
                         "OfflineDataModule")
    return int(horizon)


class CostLimitedModule(SafeRLModule):
    """A module with hyperparameters cost_limit, discount and max_episode_steps (None: the datamodule's T)."""

    @property
    def q_threshold(self) -> float:
        """The per-step Q threshold of the episode cost limit (`cost_threshold`)."""
        h = self.hparams
        return cost_threshold(h.cost_limit, h.discount, episode_steps(self, h.max_episode_steps))


def frozen_call(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """module(*args) with its parameters as constants: gradients reach the inputs only (an actor's critic term)."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args)


class ActionVAE(nn.Module):
    """Conditional VAE of dataset actions (BCQ): encoder (s, a) -> N(mu, sigma) over z (dim 2 act_dim by default,
    log sigma clamped to [-4, 15]), decoder a = tanh(D(s, z)). Sampled latents are N(0, I) clipped to +-0.5."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int = 400, latent_dim: Optional[int] = None):
        super().__init__()
        self.latent_dim = latent_dim or 2 * act_dim
        self.encoder = MLP(obs_dim + act_dim, 2 * self.latent_dim, (hidden_dim, hidden_dim))
        self.decoder = MLP(obs_dim + self.latent_dim, act_dim, (hidden_dim, hidden_dim))

    def encode(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.encoder(torch.cat([obs, actions], -1)).chunk(2, dim=-1)
        return mean, log_std.clamp(-4.0, 15.0).exp()

    def decode(self, obs: torch.Tensor, z: Optional[torch.Tensor] = None, sample: bool = True) -> torch.Tensor:
        """Actions for `obs` from latents z (default: clipped N(0, I) draws, or zeros when not `sample`)."""
        if z is None:
            shape = (obs.shape[0], self.latent_dim)
            z = (torch.randn(shape, device=obs.device, dtype=obs.dtype).clamp(-0.5, 0.5) if sample
                 else obs.new_zeros(shape))
        return torch.tanh(self.decoder(torch.cat([obs, z], -1)))

    @staticmethod
    def _kl(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return -0.5 * (1 + 2 * std.log() - mean.square() - std.square()).mean(-1)

    def kl(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Per-sample KL(q(z|s, a) || N(0, I)), averaged over latent dimensions: (B,)."""
        return self._kl(*self.encode(obs, actions))

    def loss(self, obs: torch.Tensor, actions: torch.Tensor, beta: float) -> torch.Tensor:
        """mean_b ||D(s, mu + sigma eps) - a||^2 / act_dim + beta mean_b KL."""
        mean, std = self.encode(obs, actions)
        recon = self.decode(obs, mean + std * torch.randn_like(std))
        return (recon - actions).square().mean() + beta * self._kl(mean, std).mean()
