"""CDT: the Constrained Decision Transformer (Liu et al., ICML 2023), the OSRL baseline (liuzuxin/OSRL,
osrl/algorithms/cdt.py). Trained on windows of K steps of the data module's sequence mode
(`OfflineDataModule(sequence_length=K)`).

Each step t of a window contributes four tokens, in this order, each a linear embedding plus an embedding of the
step's episode time t:

    R_t = return_scale * sum_{j >= t} r_j        (return-to-go)
    C_t = cost_scale * sum_{j >= t} c_j          (cost-to-go)
    s_t,  a_t

A causal transformer reads R_1 C_1 s_1 a_1 ... R_K C_K s_K a_K (a token sees itself and the real tokens before it;
left-padded steps are never seen). The action is predicted from the state token's output,
a_hat_t = tanh(W h(s_t)), so it depends on R_<=t, C_<=t, s_<=t and a_<t; the action token's output predicts
whether the step is costly (OSRL's auxiliary classification, weight `cost_loss_weight`):

    L = mean_{real t} ||a_hat_t - a_t||^2 + w_c mean_{real t} BCE(sigma(u h(a_t)), 1[c_t > 0])

At test time an episode starts from the targets (R, C) = (target_return, target_cost) and, after each step,
R <- R - r, C <- C - c with the received reward and cost: the policy asks for the return still to collect and the
cost still allowed. The last K steps of each episode are the context (`reset` / `act` / `observe`, the episode
runner's hooks, per env slot).

Differences from OSRL: a deterministic tanh action head (OSRL's default is a Gaussian with an entropy bonus), no
cost prefix token and no cost transform (OSRL's 50 - C; here the cost-to-go is scaled), no state-prediction loss
(weight 0 in OSRL), and no Pareto-frontier data augmentation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lightning_saferl.base import SafeRLModule
from lightning_saferl.errors import InputError

TOKENS = 4  # return-to-go, cost-to-go, state, action
FRONTIER_POINTS = 256  # the most frontier episodes kept for target_return None


class CDT(SafeRLModule):
    """CDT (module docstring). Defaults: OSRL examples/configs/cdt_configs.py.

    Args:
        sequence_length: K, the context length (the data module's `sequence_length` must match).
        embedding_dim, num_layers, num_heads, dropout: the transformer's width, depth, heads and dropout
            (embeddings, attention and residuals alike).
        max_episode_steps: size of the time embedding (later steps share the last one).
        return_scale, cost_scale: scale of the return-to-go and cost-to-go tokens (OSRL's reward_scale, cost_scale);
            return_scale 0 conditions on the cost alone (the return token is then a constant).
        cost_loss_weight: weight of the auxiliary cost classification.
        lr, weight_decay, warmup_steps: AdamW with a linear warm-up of the learning rate.
        target_return, target_cost: the conditioning targets of an evaluation episode; target_cost is an
            undiscounted episode budget (the cost-to-go at the first step). Acting settings: they may be set after
            training (attributes, or `set_acting_hparams`), so one trained CDT serves every cost limit.
            target_return None: the best episode return of the training data among episodes with cost <=
            target_cost (the data's reward-cost frontier, `fit_return_frontier`; OSRL picks such targets by hand
            per task and limit).
    """

    acting_hparams = ("target_return", "target_cost")

    def __init__(self, obs_dim: int, act_dim: int, sequence_length: int = 10, embedding_dim: int = 128,
                 num_layers: int = 3, num_heads: int = 8, dropout: float = 0.1, max_episode_steps: int = 1000,
                 return_scale: float = 0.1, cost_scale: float = 1.0, cost_loss_weight: float = 0.02,
                 lr: float = 1e-4, weight_decay: float = 1e-4, warmup_steps: int = 500,
                 target_return: Optional[float] = 300.0, target_cost: float = 10.0):
        super().__init__()
        if sequence_length < 1 or embedding_dim % num_heads:
            raise InputError(f"CDT: need sequence_length >= 1 and embedding_dim divisible by num_heads, got "
                             f"{sequence_length}, {embedding_dim}, {num_heads}")
        self.save_hyperparameters()
        self.lr = lr
        self.time_embedding = nn.Embedding(max_episode_steps, embedding_dim)
        self.return_embedding = nn.Linear(1, embedding_dim)
        self.cost_embedding = nn.Linear(1, embedding_dim)
        self.state_embedding = nn.Linear(obs_dim, embedding_dim)
        self.action_embedding = nn.Linear(act_dim, embedding_dim)
        self.input_norm = nn.LayerNorm(embedding_dim)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(embedding_dim, num_heads, 4 * embedding_dim, dropout, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(num_layers))
        self.output_norm = nn.LayerNorm(embedding_dim)
        self.action_head = nn.Linear(embedding_dim, act_dim)
        self.cost_head = nn.Linear(embedding_dim, 1)
        # the training data's frontier: (episode cost, best return at that cost or less), NaN-padded
        self.register_buffer("return_frontier", torch.full((2, FRONTIER_POINTS), float("nan")))
        self._context: Optional[dict[str, torch.Tensor]] = None

    @property
    def target_return(self) -> float:
        """hparams.target_return, else the frontier's best return at cost <= target_cost (the cheapest
        episode's where no episode is that cheap)."""
        if self.hparams.target_return is not None:
            return float(self.hparams.target_return)
        costs, returns = self.return_frontier
        known = ~costs.isnan()
        if not known.any():
            raise InputError("CDT: target_return is null (the data's best return at the target cost), but the "
                             "model has not been fitted on data; set target_return")
        within = known & (costs <= self.target_cost)
        return float(returns[within].max() if within.any() else returns[known][0])

    @target_return.setter
    def target_return(self, value: float) -> None:
        self.set_acting_hparams({"target_return": float(value)})

    @property
    def target_cost(self) -> float:
        return float(self.hparams.target_cost)

    @target_cost.setter
    def target_cost(self, value: float) -> None:
        self.set_acting_hparams({"target_cost": float(value)})

    def on_fit_start(self) -> None:
        super().on_fit_start()
        length = getattr(self.trainer.datamodule, "sequence_length", None)
        if length != self.hparams.sequence_length:
            raise InputError(f"CDT: data.sequence_length is {length}, the model's sequence_length "
                             f"{self.hparams.sequence_length}; set both to the same K")
        self.fit_return_frontier(self.dataset())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint saved before the frontier existed loads with an unfitted one (target_return must be set)."""
        checkpoint["state_dict"].setdefault("return_frontier", torch.full((2, FRONTIER_POINTS), float("nan")))

    @torch.no_grad()
    def fit_return_frontier(self, data) -> None:
        """Keep the data's episodes on the reward-cost frontier (`data.build.pareto_frontier`), sorted by cost (at
        most FRONTIER_POINTS of them, evenly spaced, the costliest kept)."""
        from lightning_saferl.data.build import pareto_frontier

        returns = data.episode_returns().double().cpu().numpy()
        costs = data.episode_costs().double().cpu().numpy()
        on = pareto_frontier(returns, costs)
        order = np.argsort(costs[on], kind="stable")
        costs, best = costs[on][order], returns[on][order]
        if len(costs) > FRONTIER_POINTS:
            keep = np.linspace(0, len(costs) - 1, FRONTIER_POINTS).round().astype(int)
            costs, best = costs[keep], best[keep]
        self.return_frontier.fill_(float("nan"))
        self.return_frontier[:, :len(costs)] = torch.as_tensor(np.stack([costs, best])).to(self.return_frontier)

    # ----------------------------------------------------------------- the transformer
    def _attention_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """(B * heads, 4K, 4K), True = blocked: token i sees real tokens j <= i, and always itself."""
        real = valid.repeat_interleave(TOKENS, dim=1)  # (B, 4K)
        n = real.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=valid.device)
        allowed = causal & (real.unsqueeze(1) | eye)
        return (~allowed).repeat_interleave(self.hparams.num_heads, dim=0)

    def forward(self, observations: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor,
                costs_to_go: torch.Tensor, timesteps: torch.Tensor, padding_mask: torch.Tensor):
        """(predicted actions (B, K, act_dim), cost logits (B, K)) of windows (B, K, ...); `padding_mask` True at
        real steps."""
        b, k = padding_mask.shape
        time = self.time_embedding(timesteps.clamp(0, self.hparams.max_episode_steps - 1))
        tokens = torch.stack([
            self.return_embedding(self.hparams.return_scale * returns_to_go.unsqueeze(-1)),
            self.cost_embedding(self.hparams.cost_scale * costs_to_go.unsqueeze(-1)),
            self.state_embedding(observations),
            self.action_embedding(actions)], dim=2) + time.unsqueeze(2)  # (B, K, 4, E)
        x = self.input_dropout(self.input_norm(tokens.reshape(b, TOKENS * k, -1)))
        mask = self._attention_mask(padding_mask)
        for block in self.blocks:
            x = block(x, src_mask=mask)
        x = self.output_norm(x).reshape(b, k, TOKENS, -1)
        return torch.tanh(self.action_head(x[:, :, 2])), self.cost_head(x[:, :, 3]).squeeze(-1)

    def losses(self, batch: dict):
        if batch["observations"].dim() != 3:
            raise InputError("CDT trains on windows: set the data module's sequence_length "
                             f"(data.sequence_length: {self.hparams.sequence_length})")
        real = batch["padding_mask"].to(batch["actions"].dtype)
        predicted, cost_logits = self(batch["observations"], batch["actions"], batch["returns_to_go"],
                                      batch["costs_to_go"], batch["timesteps"], batch["padding_mask"])
        count = real.sum().clamp(min=1.0)
        action_loss = ((predicted - batch["actions"]).square().sum(-1) * real).sum() / count
        costly = (batch["costs"] > 0).to(cost_logits.dtype)
        cost_loss = (F.binary_cross_entropy_with_logits(cost_logits, costly, reduction="none") * real).sum() / count
        return {"action_loss": action_loss, "cost_loss": self.hparams.cost_loss_weight * cost_loss}, {}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.hparams.weight_decay)
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup, 1.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----------------------------------------------------------------- acting with a per-episode context
    def _slots(self, slots: Sequence[int]) -> torch.Tensor:
        """Index of `slots` in the context, which grows (with fresh episodes) to hold them."""
        index = torch.as_tensor(list(slots), dtype=torch.long, device=self.device)
        size = 0 if self._context is None else len(self._context["valid"])
        needed = int(index.max()) + 1 if len(index) else 0
        if needed > size:
            k, hp = self.hparams.sequence_length, self.hparams
            fresh = {"observations": torch.zeros(needed, k, hp.obs_dim), "actions": torch.zeros(needed, k, hp.act_dim),
                     "returns_to_go": torch.zeros(needed, k), "costs_to_go": torch.zeros(needed, k),
                     "timesteps": torch.zeros(needed, k, dtype=torch.long),
                     "valid": torch.zeros(needed, k, dtype=torch.bool),
                     "return_left": torch.zeros(needed), "cost_left": torch.zeros(needed),
                     "step": torch.zeros(needed, dtype=torch.long)}
            fresh = {name: value.to(self.device) for name, value in fresh.items()}
            if self._context is not None:
                for name, value in self._context.items():
                    fresh[name][:size] = value
            self._context = fresh
            self.reset(range(size, needed))
        return index

    def reset(self, slots: Sequence[int]) -> None:
        """New episodes in env `slots`: empty context, targets (target_return, target_cost)."""
        index = self._slots(slots)
        for name, value in self._context.items():
            value[index] = 0
        self._context["return_left"][index] = self.target_return
        self._context["cost_left"][index] = self.target_cost

    @torch.no_grad()
    def act(self, obs: torch.Tensor, slots: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Actions for `obs` (B, obs_dim), row i continuing the episode in env slot `slots[i]` (default i): the
        step is appended to the slot's last K steps and the action is predicted at the window's last state."""
        index = self._slots(range(len(obs)) if slots is None else slots)
        ctx = self._context
        for name in ("observations", "actions", "returns_to_go", "costs_to_go", "timesteps", "valid"):
            ctx[name][index] = ctx[name][index].roll(-1, dims=1)
        ctx["observations"][index, -1] = obs.to(ctx["observations"].dtype)
        ctx["actions"][index, -1] = 0.0
        ctx["returns_to_go"][index, -1] = ctx["return_left"][index]
        ctx["costs_to_go"][index, -1] = ctx["cost_left"][index]
        ctx["timesteps"][index, -1] = ctx["step"][index]
        ctx["valid"][index, -1] = True
        predicted, _ = self(*(ctx[name][index] for name in ("observations", "actions", "returns_to_go",
                                                             "costs_to_go", "timesteps", "valid")))
        action = predicted[:, -1]
        ctx["actions"][index, -1] = action
        ctx["step"][index] += 1
        return action

    def observe(self, slots: Sequence[int], rewards: torch.Tensor, costs: torch.Tensor) -> None:
        """The reward and cost each slot's env returned for the last action: R <- R - r, C <- C - c."""
        index = self._slots(slots)
        self._context["return_left"][index] -= rewards.to(self._context["return_left"])
        self._context["cost_left"][index] -= costs.to(self._context["cost_left"])
