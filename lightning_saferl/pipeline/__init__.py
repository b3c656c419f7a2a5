"""`lightning-saferl pipeline`: run a recipe's stages in order, then evaluate the final policy.

A recipe is a YAML file:

    algorithm: fisor
    seed_everything: 0
    data: {task: PointRobot-v0, ...}            # OfflineDataModule arguments shared by all stages
    trainer: {...}                               # Trainer arguments shared by all stages
    checkpoint_every_n_steps: 1000               # a stage's checkpoints/last.ckpt is refreshed this often
    parallel_stages: 1                           # > 1: independent stages train at once in worker processes
    stages:                                      # run in this order
      feasibility_critic:
        model: {class_path: lightning_saferl.critics.FeasibilityCritic, init_args: {...}}
        trainer: {max_steps: 20000}              # per-stage Trainer overrides
        data: {batch_size: 256}                  # per-stage OfflineDataModule overrides
      actor:
        model: {class_path: lightning_saferl.actors.FisorActor, init_args: {...}}
        inputs: {feasibility_critic: feasibility_critic}   # init argument <- trained module of an earlier stage
    evaluation: {episodes: 20, num_envs: 20, seed: 0, reset_options: null, cost_limits: [10, 20, 40]}
    cost_limit: 10                               # the budget this run trains for (limit-dependent methods) ...
    cost_limit_fields: [stages.actor.model.init_args.cost_limit]   # ... copied into these fields

Cost limits: the summary reports `normalized_cost@L` and `safe@L` (normalised cost <= 1) for every L in
`evaluation.cost_limits` (one value or a list; else the old one-value `evaluation.cost_limit`); default
`[cost_limit]` when the recipe sets one, else the task family's limits (`TaskSpec.cost_limits`). `cost_limit` /
`normalized_cost` in the summary refer to the first of them. `cost_limit_fields` names the recipe fields that
follow `cost_limit` (dotted paths), or maps them to a multiple of it (`{...cost_slack: 0.5}`), so one recipe serves
every limit: `--cost_limit 20` retrains for 20 (`lightning-saferl sweep` passes each cell's limit as a number:
`run_pipeline(cfg, cost_limit=20.0)`).

Recipes are read in OmegaConf mode: `${...}` interpolates other values of the same file
(e.g. `max_steps: ${trainer.max_steps}` in a stage), and `${bf16_if_native_cpu:}` is "bf16-mixed" on a CPU that
multiplies bf16 natively, else "32-true" (`runs.bf16_if_native_cpu`; the stage's config records the value).

Precedence, lowest first: the recipe's shared `trainer`/`data`, the stage's own `trainer`/`data`, `--smoke`,
the command line's shared `--trainer.KEY` / `--data.KEY` (or `--trainer '{...}'`), and last
`--stages.<name>.<section>.<key>` (section: model, trainer, data, inputs), which changes that one key of one stage.
Values are typed by the Trainer / model / OfflineDataModule signatures; the command line wins whatever its
position relative to `--config`.

Before anything trains, the dataset of every stage is read and validated and every stage's config is checked
(unknown options, model init arguments, inputs, training length, cost limits; each model is built once, its
constructor and `SafeRLModule.check_settings` judging its values), so a mistake in the last stage fails at once.
A `class_path` outside `TRUSTED_PACKAGES` is imported only if its module's source (read, not run) defines it.
Each stage trains exactly as `fit --trainer.default_root_dir <run_dir>/<stage>` does (`lightning_saferl.runs`):
logs, `config.yaml`, `run_info.json` and `checkpoints/last.ckpt` in `<run_dir>/<stage>/lightning_logs/version_N/`
(a new N per start), and at the end `<run_dir>/<stage>/model.ckpt`. Re-running on the same run directory loads a
finished stage and resumes an interrupted one from its newest `last.ckpt`, so it continues a killed run. Every
checkpoint holds the stage's resolved config and its hash (`runs.CONFIG_KEY`; seed and the hashes of the stages
it takes inputs from included, display-only keys `runs.RESULT_NEUTRAL_KEYS` left out): a checkpoint is reused
only for the same config, otherwise the run stops naming the changed keys, and `--restart STAGE ...` trains those
stages (and the stages that take their output) afresh. A model's acting-only settings
(`SafeRLModule.acting_hparams`, e.g. FisorActor's candidate choice) are not part of that config: a finished stage is
reused with the recipe's values, which are written into its model.ckpt. While it runs, a pipeline holds a lock on
its run directory (`.pipeline.lock`): a second one on the same directory stops at once; a training stage holds
`<stage>/.stage.lock`, so a rerun refuses while a stage worker of an ended pipeline still trains. Lock files are
never written through a link. Stage workers end with their pipeline however it ends (SIGTERM, SIGKILL: each saves
its last.ckpt); a pipeline stopped by SIGTERM says to rerun the same command, which resumes. The run directory also
holds the resolved recipe (`config.yaml`), `run_info.json` (seed, package versions) and `summary.json`
(evaluation of the final policy).

Modules, by job: `recipe` (options, command-line overrides, cost limits), `classes` (the classes a recipe names),
`plan` (`make_plan`: the checked run as a value; the config it is given is left unchanged), `locks`, `stages` (one
stage's training), `workers` (stages trained at once) and `run` (`run_pipeline`, `pipeline_main`). Episodes and the
summary's metrics are `lightning_saferl.evaluation`'s (`evaluate_policy`, `print_table`).
"""
from lightning_saferl.evaluation import print_table
from lightning_saferl.pipeline.plan import Plan, make_plan, stage_conflicts
from lightning_saferl.pipeline.recipe import build_parser, evaluation_limits, parse_args, resolve_cost_limit
from lightning_saferl.pipeline.run import evaluate, pipeline_main, run_pipeline

__all__ = ["Plan", "build_parser", "evaluate", "evaluation_limits", "make_plan", "parse_args", "pipeline_main",
           "print_table", "resolve_cost_limit", "run_pipeline", "stage_conflicts"]
