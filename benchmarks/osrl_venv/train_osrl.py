"""Train one of OSRL's own BCQ-Lag (BCQL), CPQ or COptiDICE on a DSRL-format file and export its acting rule.

Runs inside OSRL's virtual environment (built by benchmarks/osrl_env.sh), never in the project's: it imports
osrl-lib 0.1.0 and dsrl 0.1.0 only, which is why it lives apart from the benchmarks run in the project's environment.
Driven by benchmarks/osrl_parity.py:

    python benchmarks/osrl_venv/train_osrl.py SETTINGS.json

SETTINGS.json (osrl_parity.osrl_settings plus task, data, acting and out): method (bcq_lag | cpq | coptidice),
task (a DSRL id such as OfflineBallCircle-v0), data (HDF5 path), seed, steps, batch_size, cost_limit, episode_len,
reward_scale, cost_scale, acting (own | mode), model (keyword arguments of OSRL's model class), trainer (of its
trainer class), out (where the exported actor goes).

The data path is OSRL's example scripts' (examples/train/train_*.py), without their logger and periodic evaluation:
``gym.make(task)`` (dsrl's OfflineEnvWrapper) -> ``get_dataset(h5path)`` -> ``set_target_cost`` ->
``pre_process_data`` (no outliers, noise, inpainting or density filter, as the defaults) -> ``TransitionDataset``
(reward and cost scales; ``state_init`` for COptiDICE) -> ``DataLoader`` -> ``Trainer.train_one_step``.

The trained acting rule is exported with ``torch.jit.trace`` (observation batch -> action batch) so that the project's
own evaluator runs it: ``own`` is what OSRL's ``model.act`` does (BCQL: the perturbation actor on one VAE sample;
CPQ and COptiDICE: a sample of the squashed Gaussian), ``mode`` the squashed Gaussian's mean for CPQ and COptiDICE.
The last printed line is a JSON object: out, train_seconds, steps.
"""
import json
import os
import sys
import time

os.environ.setdefault("DSRL_SUPPRESS_IMPORT_ERROR", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "offline")

import bullet_safety_gym  # noqa: F401,E402  (registers the simulator's tasks)
import dsrl  # noqa: F401,E402  (registers the Offline... tasks)
import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from osrl.algorithms import BCQL, COptiDICE, COptiDICETrainer, CPQ, CPQTrainer, BCQLTrainer  # noqa: E402
from osrl.common import TransitionDataset  # noqa: E402
from osrl.common.exp_util import seed_all  # noqa: E402

MODELS = {"bcq_lag": (BCQL, BCQLTrainer), "cpq": (CPQ, CPQTrainer), "coptidice": (COptiDICE, COptiDICETrainer)}


class Acting(torch.nn.Module):
    """Observation batch -> action batch, as OSRL's ``model.act`` computes it (or the Gaussian's mean: ``mode``)."""

    def __init__(self, method: str, model: torch.nn.Module, acting: str):
        super().__init__()
        self.method, self.model, self.deterministic = method, model, acting == "mode"

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.method == "bcq_lag":
            return self.model.actor(obs, self.model.vae.decode(obs))
        if self.method == "cpq":
            return self.model._actor_forward(obs, self.deterministic, False)[0]
        return self.model.actor(obs, self.deterministic, False)[0]


def main(settings_path: str) -> None:
    with open(settings_path) as f:
        cfg = json.load(f)
    method = cfg["method"]
    if method not in MODELS:
        raise SystemExit(f"{settings_path}: method {method!r} is not one of {sorted(MODELS)}")
    seed_all(cfg["seed"])
    env = gym.make(cfg["task"])
    data = env.get_dataset(cfg["data"])
    env.set_target_cost(cfg["cost_limit"])
    data = env.pre_process_data(data, None, None, None, None, 1.0)
    dataset = TransitionDataset(data, reward_scale=cfg["reward_scale"], cost_scale=cfg["cost_scale"],
                                state_init=method == "coptidice")
    loader = iter(DataLoader(dataset, batch_size=cfg["batch_size"], num_workers=0))
    model_cls, trainer_cls = MODELS[method]
    extra = {}
    if method == "coptidice":
        init_share, obs_std, act_std = dataset.get_dataset_states()
        extra = {"init_state_propotion": init_share, "observations_std": obs_std, "actions_std": act_std}
    model = model_cls(state_dim=env.observation_space.shape[0], action_dim=env.action_space.shape[0],
                      max_action=env.action_space.high[0], cost_limit=cfg["cost_limit"],
                      episode_len=cfg["episode_len"], device="cpu", **extra, **cfg["model"])
    trainer = trainer_cls(model, env, reward_scale=cfg["reward_scale"], cost_scale=cfg["cost_scale"], device="cpu",
                          **cfg["trainer"])
    started = time.time()
    for _ in range(cfg["steps"]):
        batch = next(loader)
        if method == "coptidice":
            trainer.train_one_step(batch)
        else:
            trainer.train_one_step(*batch)
    train_seconds = time.time() - started
    model.eval()
    example = torch.zeros(2, env.observation_space.shape[0])
    with torch.no_grad():
        traced = torch.jit.trace(Acting(method, model, cfg["acting"]), example, check_trace=False)
    traced.save(cfg["out"])
    print(json.dumps({"out": cfg["out"], "train_seconds": train_seconds, "steps": cfg["steps"]}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: train_osrl.py SETTINGS.json")
    main(sys.argv[1])
