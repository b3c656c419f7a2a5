"""How fast a trained FISOR policy acts and is evaluated, against the plain formulation of the same acting.

    python benchmarks/acting.py [--checkpoint PATH] [--episodes 100] [--threads N] [--repeats R] [--no_reference]

Times, with the checkpoint's own acting settings (the quick start's variant: N candidates, uniform proposals and box
vertices at critic-flagged states, the select band, the cost tie-break):
  act_ms_batch1          median ms of one `act` on one observation (observations from random starts)
  act_ms_batch1_flagged  the same on observations the feasibility critic flags (V_h > -proposal_margin: proposals
                         are scored there)
  act_ms_batch20         median ms of one `act` on 20 observations (the evaluation's batch)
  eval_seconds           wall seconds of `--episodes` random-start episodes (EpisodeRunner, all episodes at once)
and each figure of `reference_act`, the plain formulation (the noise network as its docstring writes it with torch's
mish, the schedule read from tensors, one critic call per quantity, V_h recomputed, Q_c at every state), in
the same run, alternating call by call, with the ratio reference / library. Both choose the same actions from the
same random numbers, equal up to float rounding (tests/test_fisor_acting.py). Last line: one JSON object. Timings on
a shared machine are noisy: the load average is printed; the ratios are measured in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Optional

import lightning_saferl  # noqa: F401  (first: it sets OpenMP's idle-spin default before torch starts OpenMP)
import numpy as np
import torch
from einops import rearrange, repeat
from torch.nn import functional as F

from lightning_saferl.evaluation import EpisodeRunner
from lightning_saferl.policy import load_policy

DEFAULT_CHECKPOINT = "runs/guard/actor/model.ckpt"  # the README quick start's run directory
ENV_ID = "PointRobot-v0"
OBSERVATION_SEED = 123_000  # random-start observations for the per-action timings
EPISODE_SEED = 124_000


def _scores(critic, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """(B, obs_dim), (B, P, act_dim) -> (B, P) by one `q_value` call on the repeated states."""
    n = actions.shape[1]
    flat = critic.q_value(repeat(obs, "b o -> (b n) o", n=n), rearrange(actions, "b n a -> (b n) a"))
    return rearrange(flat, "(b n) -> b n", n=n)


def plain_noise_net(net, noisy_action: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """NoiseResNet as its docstring writes it: one Linear on concat(a_t, s, cond(t)), torch's mish, every row alone."""
    cond = net.cond[2](F.mish(net.cond[0](net.time_embedding(t))))
    h = net.inp(torch.cat((noisy_action, obs, cond), dim=-1))
    for block in net.blocks:
        _, norm, expand, _, contract = block.body
        h = h + contract(F.mish(expand(norm(h))))
    return net.out[1](F.mish(h))


@torch.no_grad()
def reference_act(actor, obs: torch.Tensor) -> torch.Tensor:
    """FisorActor's acting with proposals (its module docstring) written plainly: same random draws in the same
    order, every quantity computed where it is used."""
    hp, schedule, net = actor.hparams, actor.schedule, actor.ema
    n, steps = hp.num_candidates, schedule.num_steps
    obs_rep = repeat(obs, "b o -> (b n) o", n=n)
    x = torch.randn(obs_rep.shape[0], hp.act_dim, dtype=obs.dtype)
    for k in reversed(range(steps)):
        noise = torch.randn_like(x) if k > 0 else None
        eps = plain_noise_net(net, x, torch.full((len(x),), k, dtype=obs.dtype), obs_rep)
        x = (x - schedule.betas[k] / (1 - schedule.alpha_bars[k]).sqrt() * eps) / schedule.alphas[k].sqrt()
        if noise is not None:
            x = x + schedule.betas[k].sqrt() * noise
        x = x.clamp(-schedule.clip, schedule.clip)
    candidates = rearrange(x, "(b n) a -> b n a", n=n)
    feasibility = actor.feasibility_critic
    candidate_q_h = _scores(feasibility, obs, candidates)
    actions = actor._choose(obs, candidates, candidate_q_h)
    lowest = candidate_q_h.min(1).values
    margin = hp.feasibility_margin if hp.get("proposal_margin") is None else hp.proposal_margin
    flagged = (feasibility.value(obs) > -margin).nonzero().squeeze(1)
    proposals = actor._proposals(len(flagged), obs)
    proposal_q_h = _scores(feasibility, obs[flagged], proposals)
    for i, state in enumerate(flagged.tolist()):
        if proposal_q_h[i].min() < lowest[state] - hp.proposal_gain:
            near = proposal_q_h[i] <= proposal_q_h[i].min() + hp.get("proposal_tolerance", 0.0)
            distance = (proposals[i] - actions[state]).norm(dim=-1).masked_fill(~near, float("inf"))
            actions[state] = proposals[i, distance.argmin()]
    if hp.cost_tiebreak > 0:
        lowest[flagged] = torch.minimum(lowest[flagged], proposal_q_h.min(1).values)
        q_c = _scores(actor.cost_critic, obs, candidates)
        ties = candidate_q_h <= candidate_q_h.min(1, keepdim=True).values + hp.cost_tiebreak
        shortest = candidates[torch.arange(len(obs)), q_c.masked_fill(~ties, float("inf")).argmin(1)]
        unavoidable = (feasibility.value(obs) > 0) & (lowest > 0)
        actions = torch.where(unavoidable[:, None], shortest, actions)
    return actions


class ReferencePolicy:
    """`reference_act` behind the Policy interface (for the evaluation timing)."""

    def __init__(self, actor):
        self.actor, self.device = actor, actor.device

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return reference_act(self.actor, obs)


def random_start_observations(count: int, seed: int = OBSERVATION_SEED) -> torch.Tensor:
    from lightning_saferl.envs import make_env

    env = make_env(ENV_ID)
    obs = [env.reset(seed=seed + i, options={"random_start": True})[0] for i in range(count)]
    env.close()
    return torch.as_tensor(np.stack(obs))


def alternate(fns: dict[str, Callable[[torch.Tensor], object]], batches: list[torch.Tensor]) -> dict[str, float]:
    """Median ms per function, calling each on every batch in turn (the load falls on all of them alike)."""
    for fn in fns.values():  # warm-up
        fn(batches[0])
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for batch in batches:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(batch)
            samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def evaluation_seconds(policy, episodes: int) -> tuple[float, dict]:
    runner = EpisodeRunner(ENV_ID, episodes=episodes, num_envs=episodes, seed=EPISODE_SEED,
                           reset_options={"random_start": True}, progress=False)
    start = time.perf_counter()
    metrics = runner.run(policy)
    seconds = time.perf_counter() - start
    runner.close()
    return seconds, metrics


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a trained FisorActor checkpoint")
    parser.add_argument("--episodes", type=int, default=100, help="random-start evaluation episodes (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=60, help="observations (batches) timed per figure")
    parser.add_argument("--no_reference", action="store_true", help="time the library's acting only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    actor = load_policy(args.checkpoint)
    if not hasattr(actor, "_proposals") or actor.hparams.get("uniform_proposals", 0) == 0:
        raise SystemExit(f"{args.checkpoint}: not a FisorActor acting with uniform proposals (the variant)")
    load_start = os.getloadavg()[0]
    fns = {"library": actor.act}
    if not args.no_reference:
        fns["reference"] = lambda obs: reference_act(actor, obs)
    obs = random_start_observations(20 * args.repeats)
    margin = actor.hparams.feasibility_margin if actor.hparams.get("proposal_margin") is None \
        else actor.hparams.proposal_margin
    with torch.no_grad():
        flagged_obs = obs[actor.feasibility_critic.value(obs) > -margin]
    torch.manual_seed(0)
    figures = {"act_ms_batch1": alternate(fns, list(obs[:args.repeats].split(1))),
               "act_ms_batch1_flagged": alternate(fns, list(flagged_obs[:args.repeats].split(1))),
               "act_ms_batch20": alternate(fns, list(obs.split(20)))}
    out: dict = {"checkpoint": args.checkpoint, "threads": torch.get_num_threads(),
                 "flagged_fraction_of_random_starts": len(flagged_obs) / len(obs)}
    for key, medians in figures.items():
        out[key] = medians["library"]
        if "reference" in medians:
            out[f"{key}_reference"] = medians["reference"]
            out[f"{key}_speedup"] = medians["reference"] / medians["library"]
    if args.episodes > 0:
        policies = {"library": actor} if args.no_reference else {"library": actor, "reference": ReferencePolicy(actor)}
        for name, policy in policies.items():
            seconds, metrics = evaluation_seconds(policy, args.episodes)
            suffix = "" if name == "library" else "_reference"
            out[f"eval_seconds{suffix}"] = seconds
            out[f"eval_cost_mean{suffix}"] = metrics["cost_mean"]
            out[f"eval_return_mean{suffix}"] = metrics["return_mean"]
        if not args.no_reference:
            out["eval_speedup"] = out["eval_seconds_reference"] / out["eval_seconds"]
    out["load_average_1min"] = [load_start, os.getloadavg()[0]]
    for key, value in out.items():
        print(f"{key:40s} {value:.3f}" if isinstance(value, float) else f"{key:40s} {value}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
