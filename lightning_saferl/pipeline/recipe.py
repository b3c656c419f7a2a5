"""The recipe: the pipeline's options (a recipe file, then the command line), the per-stage overrides of the
command line, the cost limit a run trains for and the limits its summary reports. The format and the precedence of
the values are described in `lightning_saferl.pipeline`."""
from __future__ import annotations

from typing import Optional, Union

import lightning as L
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace
from jsonargparse.typing import PositiveInt

from lightning_saferl.base import SafeRLModule
from lightning_saferl.data.datamodule import OfflineDataModule
from lightning_saferl.errors import InputError, UnknownNameError
from lightning_saferl.evaluation import cost_limit_list
from lightning_saferl.runs import register_resolvers

DESCRIPTION = "`lightning-saferl pipeline`: run a recipe's stages in order, then evaluate the final policy."
SMOKE_STEPS = 5
SMOKE_EPISODES = 2
STAGE_KEYS = ("model", "trainer", "data", "inputs")
#: OfflineDataModule arguments that decide which dataset is read (the others only change the sampling)
DATASET_KEYS = ("task", "path", "cache_dir", "num_transitions", "scale_reward", "download", "behavior")


def build_parser() -> ArgumentParser:
    register_resolvers()
    parser = ArgumentParser(prog="lightning-saferl pipeline", description=DESCRIPTION,
                            default_meta=False, exit_on_error=False, parser_mode="omegaconf")
    parser.add_argument("--config", action=ActionConfigFile,
                        help="recipe YAML (several compose in order; ${...} interpolation within a file)")
    parser.add_argument("--algorithm", type=str, default="custom", help="name recorded in the summary")
    parser.add_argument("--run_dir", type=Optional[str], default=None,
                        help="run directory (default runs/<algorithm>-<task>-<time>); reuse it to resume")
    parser.add_argument("--smoke", action=ActionYesNo, default=False,
                        help=f"{SMOKE_STEPS} steps per stage and {SMOKE_EPISODES} evaluation episodes")
    parser.add_argument("--seed_everything", type=int, default=0)
    parser.add_argument("--parallel_stages", type=PositiveInt, default=1,
                        help="train up to this many stages at once, in worker processes (a stage starts when the "
                             "stages it takes inputs from are finished; this process's torch threads are shared "
                             "among those running, anew whenever one starts or ends; at most one worker per thread; "
                             "none when a stage runs on several devices or nodes)")
    parser.add_argument("--checkpoint_every_n_steps", type=PositiveInt, default=1000,
                        help="each stage refreshes checkpoints/last.ckpt this often (and at the end and on SIGTERM)")
    parser.add_argument("--restart", nargs="+", type=str, default=[], metavar="STAGE",
                        help="stages to train afresh although the run directory holds a checkpoint of a different "
                             "config (the stages that take their output restart too)")
    parser.add_class_arguments(OfflineDataModule, "data")
    add_trainer_arguments(parser)
    parser.set_defaults({"trainer.num_sanity_val_steps": 0, "trainer.limit_val_batches": 0})
    parser.add_argument("--stages", type=dict, required=True, help="name -> {model, trainer, data, inputs}")
    parser.add_argument("--overrides", type=list[str], default=[],
                        help="command-line --trainer.*, --data.* and --stages.<name>.* values, applied to every "
                             "stage after the recipe (`lightning-saferl pipeline` fills this in)")
    parser.add_argument("--evaluation.episodes", type=PositiveInt, default=20)
    parser.add_argument("--evaluation.num_envs", type=PositiveInt, default=20)
    parser.add_argument("--evaluation.seed", type=int, default=0)
    parser.add_argument("--evaluation.reset_options", type=Optional[dict], default=None)
    parser.add_argument("--evaluation.cost_limit", type=Optional[float], default=None,
                        help="one limit of the normalized cost (old spelling of evaluation.cost_limits)")
    parser.add_argument("--evaluation.cost_limits", type=Optional[Union[float, list[float]]], default=None,
                        help="limits the summary scores the policy at (default [cost_limit], else the task family's)")
    parser.add_argument("--cost_limit", type=Optional[float], default=None,
                        help="the cost budget this run trains for, copied into cost_limit_fields")
    parser.add_argument("--cost_limit_fields", type=Union[list[str], dict[str, float]], default=[],
                        help="recipe fields (dotted paths) set to cost_limit, or a mapping field -> multiple of it")
    return parser


def add_trainer_arguments(parser: ArgumentParser) -> None:
    """Trainer arguments as LightningCLI declares them: typed, not instantiated (the run builds the Trainer)."""
    parser.add_class_arguments(L.Trainer, "trainer", instantiate=False, sub_configs=True, fail_untyped=False,
                               skip={"default_root_dir"})


def stage_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False, default_meta=False)
    parser.add_subclass_arguments(SafeRLModule, "model", required=True)
    add_trainer_arguments(parser)
    parser.add_class_arguments(OfflineDataModule, "data")
    parser.add_argument("--inputs", type=dict, default={})
    return parser


def option_groups(argv: list[str]) -> list[list[str]]:
    """Command-line arguments grouped as [option] or [option, value] (a value never starts with '--')."""
    groups, i = [], 0
    while i < len(argv):
        n = 2 if "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
        groups.append(argv[i:i + n])
        i += n
    return groups


def option_name(group: list[str]) -> str:
    return group[0].partition("=")[0]


def parse_args(argv: list[str]) -> Namespace:
    """The pipeline's config from a command line. Its `--trainer*`, `--data*` and `--stages.<name>.*` values are
    also kept in `overrides`, which each stage applies after its recipe values (precedence: module docstring)."""
    configs, rest, overrides = [], [], []
    for group in option_groups(argv):
        name = option_name(group)
        if name == "--config":
            configs += group
        elif name.startswith("--stages."):
            overrides += group
        else:
            rest += group
            if name.split(".")[0] in ("--trainer", "--data"):
                overrides += group
    cfg = build_parser().parse_args([*configs, *rest])  # recipe files first: the command line wins
    for group in option_groups(overrides):
        parts = option_name(group).split(".")
        if parts[0] == "--stages" and (len(parts) < 4 or parts[1] not in cfg.stages):
            raise UnknownNameError(f"{option_name(group)}: expected --stages.<name>.<section>.<key> with a stage "
                                   f"of the recipe ({', '.join(cfg.stages)})")
    cfg.overrides = [*cfg.overrides, *overrides]
    return cfg


def stage_overrides(overrides: list[str], name: str) -> tuple[list[str], dict[str, str]]:
    """(arguments for the stage parser, inputs to set) from `overrides`: the shared ones, then this stage's."""
    shared, own, inputs = [], [], {}
    for group in option_groups(overrides):
        option = option_name(group)
        if not option.startswith("--stages."):
            shared += group
        elif option.startswith(f"--stages.{name}.inputs."):
            inputs[option.split(".", 3)[3]] = group[0].partition("=")[2] if "=" in group[0] else group[-1]
        elif option.startswith(f"--stages.{name}."):
            own += ["--" + group[0][len(f"--stages.{name}."):], *group[1:]]
    return shared + own, inputs


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def resolve_cost_limit(cfg: Namespace, cost_limit: Optional[float] = None) -> Namespace:
    """A copy of `cfg` (which is left as it is) whose `cost_limit` is `cost_limit` where one is given (it wins over
    the recipe's and the command line's), with every field of `cost_limit_fields` set to that limit (times its
    factor, for a mapping)."""
    cfg = cfg.clone()
    if cost_limit is not None:
        cfg.cost_limit = float(cost_limit)
    fields = cfg.cost_limit_fields
    fields = dict(fields) if isinstance(fields, dict) else {path: 1.0 for path in fields or []}
    if fields and cfg.cost_limit is None:
        raise InputError(f"cost_limit_fields {list(fields)} follow cost_limit, but the recipe sets no cost_limit")
    if cfg.cost_limit is not None:
        cost_limit_list(cfg.cost_limit, "cost_limit")
    for path, factor in fields.items():
        *parents, leaf = path.split(".")
        node = cfg
        for part in parents:
            node = node.get(part) if isinstance(node, (dict, Namespace)) else None
        if not isinstance(node, (dict, Namespace)) or leaf not in node:
            raise InputError(f"cost_limit_fields: {path!r} is not a field of the recipe")
        node[leaf] = float(factor) * cfg.cost_limit
    return cfg


def evaluation_limits(cfg: Namespace, task_spec) -> list[float]:
    """The cost limits the summary reports (`lightning_saferl.pipeline`'s docstring)."""
    ev = cfg.evaluation
    given = ev.cost_limits if ev.cost_limits is not None else ev.cost_limit
    if given is None:
        given = cfg.cost_limit if cfg.cost_limit is not None else list(task_spec.cost_limits)
    return cost_limit_list(given, "evaluation.cost_limits")


def plain(obj):
    if isinstance(obj, Namespace):
        obj = obj.as_dict()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
