"""`lightning-saferl pipeline`: stages in order, checkpoints, summary, overrides, recipe checks, baseline recipes.

All runs are in-process (`lightning_saferl.cli.main`) on tiny datasets with tiny networks and a few steps.
"""
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import gymnasium
import pytest
import lightning.pytorch  # noqa: F401  (before any test: its log handler then writes to the real stderr, not
# to the stderr a test captures, as for a user who sees Lightning's lines above the one error line)
import torch
import yaml

from lightning_saferl.cli import main
import lightning_saferl.envs
from lightning_saferl.pipeline import parse_args, stage_conflicts
from lightning_saferl.pipeline.recipe import stage_overrides
from lightning_saferl import runs
from lightning_saferl.runs import CONFIG_KEY, atomic_write_text
from tiny_data import write_tiny

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
SUMMARY_KEYS = {"task", "algorithm", "episodes", "return_mean", "cost_mean", "violation_free_fraction"}


def fisor_recipe(data_path, steps=4):
    return {
        "algorithm": "fisor",
        "data": {"task": "PointRobot-v0", "path": data_path, "batch_size": 16, "steps_per_epoch": 3},
        "trainer": {"max_steps": steps, "log_every_n_steps": 1, **QUIET},
        "checkpoint_every_n_steps": 2,
        "stages": {
            "feasibility_critic": {"model": {"class_path": "lightning_saferl.critics.FeasibilityCritic",
                                             "init_args": {"hidden_dims": [8]}}},
            "reward_critic": {"model": {"class_path": "lightning_saferl.critics.RewardCritic",
                                        "init_args": {"hidden_dims": [8]}}},
            "actor": {"model": {"class_path": "lightning_saferl.actors.FisorActor",
                                "init_args": {"hidden_dim": 8, "num_blocks": 1, "num_candidates": 2}},
                      "inputs": {"feasibility_critic": "feasibility_critic", "reward_critic": "reward_critic"}}},
        "evaluation": {"episodes": 2, "num_envs": 2},
    }


def write_yaml(path, obj):
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def fisor_run(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("fisor")
    recipe = write_yaml(root / "recipe.yaml", fisor_recipe(tiny))
    main(["pipeline", "--config", recipe, "--run_dir", str(root / "run")])
    return root / "run", recipe


def version_dir(run, stage, n=0):
    return run / stage / "lightning_logs" / f"version_{n}"


def test_pipeline_writes_checkpoints_records_and_summary(fisor_run, capsys):
    run, _ = fisor_run
    for stage in ("feasibility_critic", "reward_critic", "actor"):
        final = torch.load(run / stage / "model.ckpt", weights_only=True)
        assert final["global_step"] == 4
        assert "optimizer_states" not in final  # model.ckpt holds the weights only
        logs = version_dir(run, stage)  # the layout of `fit --trainer.default_root_dir <run>/<stage>`
        last = torch.load(logs / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 4 and last["OfflineDataModule"]["batches_drawn"] == 4
        assert "optimizer_states" in last  # last.ckpt is a full resumable state
        assert yaml.safe_load((logs / "config.yaml").read_text())["trainer"]["max_steps"] == 4
        assert json.loads((logs / "run_info.json").read_text())["command"][:2] == ["lightning-saferl", "pipeline"]
        assert list(logs.glob("events.out.tfevents.*")) and (logs / "metrics.csv").exists()
        # both checkpoints carry the stage's resolved config and its hash
        assert final[CONFIG_KEY] == last[CONFIG_KEY] and len(final[CONFIG_KEY]["sha256"]) == 64
        assert final[CONFIG_KEY]["config"]["trainer.max_steps"] == 4
    records = {s: torch.load(run / s / "model.ckpt", weights_only=True)[CONFIG_KEY] for s in ("reward_critic", "actor")}
    assert records["actor"]["config"]["input_sha256.reward_critic"] == records["reward_critic"]["sha256"]
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert (summary["task"], summary["algorithm"], summary["episodes"]) == ("PointRobot-v0", "fisor", 2)
    assert type(summary["episodes"]) is int and type(summary["return_mean"]) is float  # counts stay integers
    assert "normalized_return" not in summary  # PointRobot has no DSRL reference scores
    info = json.loads((run / "run_info.json").read_text())
    assert info["seed"] == 0 and info["versions"]["lightning"]
    assert yaml.safe_load((run / "config.yaml").read_text())["stages"]["actor"]["inputs"]["reward_critic"]


def test_rerun_on_a_finished_run_dir_only_evaluates(fisor_run, capsys):
    run, recipe = fisor_run
    before = {p: p.stat().st_mtime_ns for p in run.glob("*/model.ckpt")}
    main(["pipeline", "--config", recipe, "--run_dir", str(run)])
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 3
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/model.ckpt")} == before
    assert "summary" in out and "violation_free_fraction" in out  # the table


def test_a_stage_checkpoint_serves_validate_and_fit(fisor_run, tiny, tmp_path):
    """The stage's checkpoints work with the LightningCLI commands: the model class and arguments come from the
    file, its dims are checked against the data (Lightning's own --ckpt_path reading would pass obs_dim as an
    option and fail)."""
    run, _ = fisor_run
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    main(["validate", "--ckpt_path", str(run / "reward_critic" / "model.ckpt"), "--data.path", tiny,
          "--trainer.default_root_dir", str(tmp_path / "validate"), *quiet])
    assert any(row.startswith("val/") for row in
               (tmp_path / "validate" / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
               .split(","))
    last = version_dir(run, "reward_critic") / "checkpoints" / "last.ckpt"
    main(["fit", "--ckpt_path", str(last), "--data.path", tiny, "--data.batch_size", "16", "--trainer.max_steps", "5",
          "--trainer.default_root_dir", str(tmp_path / "fit"), *quiet])
    resumed = tmp_path / "fit" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)["global_step"] == 5


def test_smoke_and_overrides(tmp_path, tiny, monkeypatch):
    other = write_tiny(tmp_path / "other.hdf5", n=120, episode=40)
    recipe = write_yaml(tmp_path / "r.yaml", fisor_recipe(tiny, steps=50))
    replaced = []  # files renamed into place: written under a temporary name first
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(Path(dst).name), real_replace(src, dst)))
    summary = main_summary(["pipeline", "--config", recipe, "--run_dir", str(tmp_path / "run"), "--smoke",
                            "--data.path", other, "--algorithm", "mine"])
    assert summary["algorithm"] == "mine" and summary["episodes"] == 2
    config = yaml.safe_load((version_dir(tmp_path / "run", "actor") / "config.yaml").read_text())
    assert config["data"]["path"] == other and config["trainer"]["max_steps"] == 5  # --smoke
    assert torch.load(tmp_path / "run" / "actor" / "model.ckpt", weights_only=True)["global_step"] == 5
    assert {"summary.json", "config.yaml", "run_info.json", "model.ckpt"} <= set(replaced)
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_command_line_wins_over_the_recipe_at_every_level(tmp_path, tiny):
    recipe = fisor_recipe(tiny, steps=50)  # shared recipe value: 50
    recipe["stages"]["reward_critic"]["trainer"] = {"max_steps": 3}  # a stage's own recipe value
    recipe["stages"]["actor"]["data"] = {"batch_size": 12}
    path = write_yaml(tmp_path / "r.yaml", recipe)
    run = tmp_path / "run"
    # the shared value comes before --config and still wins; a stage's value wins over the shared one
    main(["pipeline", "--trainer.max_steps", "4", "--config", path, "--run_dir", str(run),
          "--stages.actor.trainer.max_steps", "2", "--stages.actor.model.init_args.num_candidates", "3",
          "--data.batch_size", "8", "--stages.reward_critic.data.steps_per_epoch", "2"])
    steps = {s: torch.load(run / s / "model.ckpt", weights_only=True)["global_step"]
             for s in ("feasibility_critic", "reward_critic", "actor")}
    assert steps == {"feasibility_critic": 4, "reward_critic": 4, "actor": 2}
    configs = {s: yaml.safe_load((version_dir(run, s) / "config.yaml").read_text()) for s in steps}
    actor = configs["actor"]
    assert actor["model"]["init_args"]["num_candidates"] == 3  # typed by the signature
    assert actor["model"]["init_args"]["hidden_dim"] == 8 and actor["inputs"]["reward_critic"] == "reward_critic"
    assert actor["data"]["batch_size"] == 8  # the command line's shared value beats the stage's recipe value
    assert configs["reward_critic"]["data"]["steps_per_epoch"] == 2
    assert configs["feasibility_critic"]["data"]["steps_per_epoch"] == 3  # only that stage's key changed
    assert actor["trainer"]["log_every_n_steps"] == 1 and actor["trainer"]["enable_progress_bar"] is False


def test_recipe_interpolation_and_typed_shared_values(tmp_path, tiny):
    recipe = fisor_recipe(tiny)
    recipe["stages"]["actor"]["trainer"] = {"max_steps": "${trainer.max_steps}"}
    cfg = parse_args(["--config", write_yaml(tmp_path / "r.yaml", recipe), "--trainer.max_steps", "10"])
    assert cfg.stages["actor"]["trainer"]["max_steps"] == 4  # resolved within the recipe file (OmegaConf)
    assert cfg.trainer.max_steps == 10  # an int, typed by the Trainer signature
    assert cfg.overrides == ["--trainer.max_steps", "10"]  # applied to each stage after its recipe values
    with pytest.raises(KeyError, match="--stages.critic.trainer.max_steps"):
        parse_args(["--config", write_yaml(tmp_path / "r.yaml", recipe), "--stages.critic.trainer.max_steps", "1"])
    # a stage applies the shared values, then its own (whatever their order), and sets named inputs
    args, inputs = stage_overrides(["--stages.actor.trainer.max_steps=2", "--trainer.max_steps", "4",
                                    "--stages.actor.inputs.reward_critic", "feasibility_critic",
                                    "--stages.reward_critic.data.batch_size", "3"], "actor")
    assert args == ["--trainer.max_steps", "4", "--trainer.max_steps=2"]
    assert inputs == {"reward_critic": "feasibility_critic"}


@pytest.mark.parametrize("native, cuda, expected", [(True, False, "bf16-mixed"), (False, False, "32-true"),
                                                    (True, True, "32-true")])
def test_the_quick_start_recipe_trains_its_actor_in_bf16_only_on_a_cpu_that_has_it(monkeypatch, native, cuda,
                                                                                    expected):
    # `${bf16_if_native_cpu:}` resolves when the recipe is read, so the stage's config (and its hash) holds the value
    monkeypatch.setattr(runs, "native_bf16_cpu", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = parse_args(["--config", str(CONFIGS / "fisor_guard" / "point_robot.yaml")])
    assert cfg.stages["actor"]["trainer"]["precision"] == expected
    assert cfg.trainer.get("precision") is None  # the critics train in float32
    assert not {"precision"} & {key for name in ("feasibility_critic", "reward_critic", "cost_critic")
                                for key in cfg.stages[name]["trainer"]}
    published = parse_args(["--config", str(CONFIGS / "fisor" / "point_robot.yaml")])
    assert published.stages["actor"]["trainer"].get("precision") is None  # the published method: float32


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU's flags from /proc/cpuinfo")
def test_native_bf16_follows_the_cpu_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert runs.native_bf16_cpu() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_rerun_with_another_config_is_refused_until_restarted(fisor_run, tmp_path, capsys):
    source, recipe = fisor_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    base = ["pipeline", "--config", recipe, "--run_dir", str(run)]
    mtimes = {p: p.stat().st_mtime_ns for p in run.glob("*/model.ckpt")}
    changed = ["--stages.actor.model.init_args.feasible_temperature", "4.0",
               "--stages.reward_critic.trainer.max_steps", "5"]
    with pytest.raises(SystemExit) as exit_:
        main([*base, *changed])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'reward_critic' (trainer.max_steps)" in err
    assert "'actor' (input_sha256.reward_critic, model.init_args.feasible_temperature)" in err
    assert "--restart reward_critic actor" in err
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/model.ckpt")} == mtimes  # nothing trained
    assert stage_conflicts(parse_args([*base[1:], *changed]))["reward_critic"] == ["trainer.max_steps"]
    # display-only keys may change
    main([*base, "--trainer.log_every_n_steps", "3", "--trainer.enable_model_summary", "true"])
    assert capsys.readouterr().out.count("finished earlier") == 3
    # an interrupted stage (last.ckpt only) is checked too
    (run / "actor" / "model.ckpt").unlink()
    assert stage_conflicts(parse_args([*base[1:], *changed[:2]])) == {
        "actor": ["model.init_args.feasible_temperature"]}
    # --restart trains the stage afresh, and the stages that take its output
    main([*base, "--restart", "reward_critic", *changed])
    out = capsys.readouterr().out
    assert "stage 'feasibility_critic': finished earlier" in out
    assert "stage 'reward_critic': RewardCritic, max_steps=5, restarted" in out
    assert "stage 'actor': FisorActor, max_steps=4, restarted" in out
    assert torch.load(run / "reward_critic" / "model.ckpt", weights_only=True)["global_step"] == 5
    assert (version_dir(run, "actor", 1) / "checkpoints" / "last.ckpt").exists()  # a new run directory
    assert yaml.safe_load((run / "config.yaml").read_text())["restart"] == []  # a rerun of it reuses the stages
    main([*base, *changed])
    assert capsys.readouterr().out.count("finished earlier") == 3


def test_acting_settings_change_without_retraining(fisor_run, tmp_path, capsys):
    source, recipe = fisor_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    base = ["pipeline", "--config", recipe, "--run_dir", str(run)]
    before = torch.load(run / "actor" / "model.ckpt", weights_only=True)
    acting = ["--stages.actor.model.init_args.num_candidates", "3",
              "--stages.actor.model.init_args.uniform_proposals", "16",
              "--stages.actor.model.init_args.proposal_gain", "0.01"]
    assert stage_conflicts(parse_args([*base[1:], *acting])) == {}
    main([*base, *acting])
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 3 and "acting settings" in out
    after = torch.load(run / "actor" / "model.ckpt", weights_only=True)
    assert after["hyper_parameters"]["num_candidates"] == 3 and after["hyper_parameters"]["proposal_gain"] == 0.01
    assert before["hyper_parameters"]["num_candidates"] == 2
    assert after["state_dict"].keys() == before["state_dict"].keys()
    assert all(torch.equal(after["state_dict"][k], before["state_dict"][k]) for k in before["state_dict"])
    assert after[CONFIG_KEY] == before[CONFIG_KEY]  # the training record: acting settings are not part of it
    # an invalid acting value is refused with the module's own check, and the checkpoint keeps its settings
    with pytest.raises(SystemExit):
        main([*base, "--stages.actor.model.init_args.proposal_gain", "-1.0"])
    assert "proposal_gain must be >= 0" in capsys.readouterr().err
    assert torch.load(run / "actor" / "model.ckpt", weights_only=True)["hyper_parameters"]["proposal_gain"] == 0.01
    # a setting the weights depend on still retrains
    assert stage_conflicts(parse_args([*base[1:], "--stages.actor.model.init_args.feasibility_margin", "0.1"])) == {
        "actor": ["model.init_args.feasibility_margin"]}
    # the contract the reuse rests on: trained afresh with these acting settings, the weights are the same
    fresh = tmp_path / "fresh"
    main(["pipeline", "--config", recipe, "--run_dir", str(fresh), *acting])
    trained = torch.load(fresh / "actor" / "model.ckpt", weights_only=True)["state_dict"]
    assert all(torch.allclose(trained[k].float(), before["state_dict"][k].float(), atol=1e-6) for k in trained)


def test_a_run_dir_in_use_by_another_pipeline_is_refused(fisor_run, tmp_path, capsys, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    source, recipe = fisor_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with open(run / ".pipeline.lock", "a+") as held:  # as a running pipeline holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("pid 4242 on elsewhere")
        held.flush()
        with pytest.raises(SystemExit):
            main(["pipeline", "--config", recipe, "--run_dir", str(run)])
        err = capsys.readouterr().err
        assert f"{run} is in use by another pipeline (pid 4242 on elsewhere)" in err
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".pipeline.lock"} \
            == {p: m for p, m in mtimes.items() if p.name != ".pipeline.lock"}  # nothing written
        monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank's own run of the command takes no lock
        main(["pipeline", "--config", recipe, "--run_dir", str(run)])
        monkeypatch.delenv("LOCAL_RANK")
    main(["pipeline", "--config", recipe, "--run_dir", str(run)])  # released: the rerun goes ahead
    assert capsys.readouterr().out.count("finished earlier") == 6


@pytest.fixture
def torch_threads(request):
    """This process's torch threads, the budget a pipeline's stage workers share, set whatever this machine has:
    2, or the test's indirect parameter."""
    threads = torch.get_num_threads()
    torch.set_num_threads(getattr(request, "param", 2))
    yield
    torch.set_num_threads(threads)


def test_parallel_stages_train_independent_stages_at_once_and_match_the_sequential_run(fisor_run, tmp_path, capfd,
                                                                                       torch_threads):
    sequential, recipe = fisor_run
    run = tmp_path / "run"
    main(["pipeline", "--config", recipe, "--run_dir", str(run), "--parallel_stages", "2"])
    out = capfd.readouterr().out
    # both critics start together and share the threads; the actor starts when both are finished and gets them all
    for stage, threads in (("feasibility_critic", 1), ("reward_critic", 1), ("actor", 2)):
        assert f"stage '{stage}': {threads} threads in process" in out
        ours = torch.load(run / stage / "model.ckpt", weights_only=True)["state_dict"]
        theirs = torch.load(sequential / stage / "model.ckpt", weights_only=True)["state_dict"]
        assert ours.keys() == theirs.keys()
        assert all(torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-5) for k in ours)  # same seeding
    assert json.loads((run / "summary.json").read_text())["episodes"] == 2


def test_a_stage_still_training_takes_the_threads_of_a_finished_one(tiny, tmp_path, capfd, torch_threads):
    recipe = write_yaml(tmp_path / "r.yaml", fisor_recipe(tiny))
    main(["pipeline", "--config", recipe, "--run_dir", str(tmp_path / "run"), "--parallel_stages", "2",
          "--stages.feasibility_critic.trainer.max_steps", "600"])  # the reward critic (4 steps) ends first
    out = capfd.readouterr().out
    assert "stage 'feasibility_critic': 1 threads in process" in out
    handed = out.split("stage 'feasibility_critic': 2 threads from step ")
    assert len(handed) == 2 and 4 <= int(handed[1].split()[0]) < 600  # after the reward critic, before the end
    assert "stage 'actor': 2 threads in process" in out
    assert torch.load(tmp_path / "run" / "feasibility_critic" / "model.ckpt", weights_only=True)["global_step"] == 600


# e.g. a benchmark unit or a sweep cell given one core: workers would only compete
@pytest.mark.parametrize("torch_threads", [1], indirect=True)
def test_parallel_stages_train_in_process_with_one_thread(fisor_run, tmp_path, capfd, torch_threads):
    _, recipe = fisor_run
    main(["pipeline", "--config", recipe, "--run_dir", str(tmp_path / "run"), "--parallel_stages", "2"])
    out = capfd.readouterr().out
    assert out.count("FisorActor, max_steps=4") == 1 and "threads in process" not in out


def test_stages_train_in_process_where_a_stage_has_processes_of_its_own(tiny, tmp_path, monkeypatch, torch_threads):
    from lightning_saferl.pipeline import make_plan
    from lightning_saferl.pipeline.workers import stage_workers

    recipe = write_yaml(tmp_path / "r.yaml", fisor_recipe(tiny))
    stages = ["feasibility_critic", "reward_critic", "actor"]

    def workers(*args):
        cfg = parse_args(["--config", recipe, "--run_dir", str(tmp_path / "run"), "--parallel_stages", "4", *args])
        return stage_workers(make_plan(cfg), stages)

    assert workers() == 2  # one per thread
    assert workers("--trainer.devices", "[0]") == 2 and workers("--trainer.devices", "0,") == 2
    assert workers("--trainer.devices", "0,1") == 1
    assert workers("--stages.actor.trainer.devices", "2") == 1  # its DDP processes would be the workers' children
    assert workers("--trainer.devices", "auto") == (2 if torch.cuda.device_count() < 2 else 1)  # every GPU
    assert workers("--trainer.num_nodes", "2") == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / srun: every rank runs the pipeline
    assert workers() == 1


def test_a_failing_stage_in_a_worker_stops_the_pipeline_with_its_error(tiny, tmp_path, torch_threads):
    from lightning_saferl.base import NonFiniteLossError
    from lightning_saferl.pipeline import run_pipeline

    recipe = fisor_recipe(tiny)
    recipe["stages"]["reward_critic"]["model"]["init_args"]["lr"] = float("inf")  # the first update makes NaN
    path = write_yaml(tmp_path / "r.yaml", recipe)
    with pytest.raises(NonFiniteLossError, match="stage 'reward_critic': RewardCritic: loss '.*' is nan at step 1"):
        run_pipeline(parse_args(["--config", path, "--run_dir", str(tmp_path / "run"), "--parallel_stages", "2"]))
    assert not (tmp_path / "run" / "reward_critic" / "model.ckpt").exists()
    assert not (tmp_path / "run" / "actor").exists()  # never started


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def main_summary(argv):
    main(argv)
    run_dir = Path(argv[argv.index("--run_dir") + 1])
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("recipe", ["bc_all_point_robot.yaml", "bc_safe_point_robot.yaml"])
def test_point_robot_baseline_recipes(tmp_path, tiny, recipe):
    summary = main_summary(["pipeline", "--config", str(CONFIGS / "baselines" / recipe), "--smoke",
                            "--data.path", tiny, "--run_dir", str(tmp_path / "run"),
                            "--trainer", json.dumps({**QUIET, "logger": False})])
    assert summary["algorithm"] == recipe.split("_point")[0] and summary["task"] == "PointRobot-v0"
    assert SUMMARY_KEYS <= set(summary)


def test_fisor_quick_start_recipe_runs_the_variant_with_its_acting_settings(tmp_path, tiny, caplog):
    # the README's quick start (the variant fisor_guard), at smoke size: its callbacks, the cost critic stage, and the
    # actor's uniform proposals and cost tie-break in the evaluation.
    # Lightning's lines that a run cannot act on stay out of its output (`runs.quiet_upstream`).
    recipe = str(CONFIGS / "fisor_guard" / "point_robot.yaml")
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as shown:  # the filters in force, as a run has them
        summary = main_summary(["pipeline", "--config", recipe, "--smoke", "--data.path", tiny,
                                "--run_dir", str(tmp_path / "run"), "--trainer", json.dumps(QUIET)])
    assert summary["algorithm"] == "fisor_guard" and SUMMARY_KEYS <= set(summary)
    actor = torch.load(tmp_path / "run" / "actor" / "model.ckpt", weights_only=True)
    assert actor["hyper_parameters"]["uniform_proposals"] > 0 and actor["hyper_parameters"]["proposal_gain"] > 0
    assert actor["hyper_parameters"]["cost_tiebreak"] > 0 and "cost_critic" in actor["critic_hparams"]
    assert actor[CONFIG_KEY]["config"]["trainer.precision"] == runs.bf16_if_native_cpu()  # what it trained with
    assert not [str(w.message) for w in shown if "LeafSpec" in str(w.message) or "eval mode" in str(w.message)]
    assert "GPU available" in caplog.text and "litlogger" not in caplog.text  # Lightning's other lines still show


@pytest.mark.parametrize("recipe", ["bc_all_dsrl.yaml", "bc_safe_dsrl.yaml"])
def test_dsrl_baseline_recipes_report_normalized_scores(tmp_path, tiny, recipe, monkeypatch):
    # a DSRL task id with a stand-in environment of the same shapes (the real simulators are not installed)
    monkeypatch.setitem(lightning_saferl.envs.ENV_FACTORIES, "OfflineBallRun-v0",
                        lambda **kw: gymnasium.make("PointRobot-v0"))
    recipe_cfg = yaml.safe_load((CONFIGS / "baselines" / recipe).read_text())
    assert recipe_cfg.get("cost_limit", 10) == 10  # BC-Safe trains for 10; BC-All is scored at the family's limits
    assert recipe_cfg["stages"]["policy"]["model"]["init_args"].get("cost_limit", 10) == 10
    summary = main_summary(["pipeline", "--config", str(CONFIGS / "baselines" / recipe), "--smoke",
                            "--data.task", "OfflineBallRun-v0", "--data.path", tiny,
                            "--run_dir", str(tmp_path / "run"), "--trainer", json.dumps(QUIET)])
    assert summary["task"] == "OfflineBallRun-v0" and summary["cost_limit"] == 10
    # DSRL formulas with the task's reference values (BallRun: R in [26.34, 1327.45], episodes of 100 steps)
    assert summary["normalized_return"] == pytest.approx(
        (summary["return_mean"] - 26.339754104614258) / (1327.445556640625 - 26.339754104614258))
    assert summary["normalized_cost"] == pytest.approx(summary["cost_mean"] / 10)
    assert summary["length_mean"] <= 100


class _ConstantCostEnv(gymnasium.Env):
    """A PointRobot-shaped stand-in for a DSRL task: reward 1 and cost 0.25 at every step, never ends by itself."""

    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (11,))
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (2,))

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.low * 0, {}

    def step(self, action):
        return self.observation_space.low * 0, 1.0, False, False, {"cost": 0.25}


def test_summary_scores_every_limit_of_the_task_family(tmp_path, tiny, monkeypatch):
    """BC-All's DSRL recipe sets no limit: the summary scores the Bullet-Safety-Gym limits 10, 20, 40. BallRun's
    episodes are cut at 100 steps, so R = 100 and C = 25 in every episode: normalised cost 2.5, 1.25, 0.625."""
    monkeypatch.setitem(lightning_saferl.envs.ENV_FACTORIES, "OfflineBallRun-v0", lambda **kw: _ConstantCostEnv())
    summary = main_summary(["pipeline", "--config", str(CONFIGS / "baselines" / "bc_all_dsrl.yaml"), "--smoke",
                            "--data.task", "OfflineBallRun-v0", "--data.path", tiny,
                            "--run_dir", str(tmp_path / "run"), "--trainer", json.dumps(QUIET)])
    assert (summary["return_mean"], summary["cost_mean"], summary["length_mean"]) == (100.0, 25.0, 100.0)
    assert summary["cost_limits"] == [10.0, 20.0, 40.0] and summary["cost_limit"] == 10.0
    scores = {key: value for key, value in summary.items() if "@" in key}
    assert scores == pytest.approx({"normalized_cost@10": 2.5, "safe@10": False, "normalized_cost@20": 1.25,
                                    "safe@20": False, "normalized_cost@40": 0.625, "safe@40": True})
    assert summary["normalized_cost"] == 2.5  # the first limit's
    assert summary["normalized_return"] == pytest.approx((100 - 26.339754104614258) /
                                                         (1327.445556640625 - 26.339754104614258))


def test_evaluation_limits_come_from_the_evaluation_block_the_recipe_or_the_task_family():
    from jsonargparse import Namespace

    from lightning_saferl.data.tasks import get_task
    from lightning_saferl.pipeline import evaluation_limits

    def limits(task, recipe_limit=None, cost_limits=None, cost_limit=None):
        cfg = Namespace(cost_limit=recipe_limit, evaluation=Namespace(cost_limits=cost_limits, cost_limit=cost_limit))
        return evaluation_limits(cfg, get_task(task))

    assert limits("OfflineCarCircle-v0") == [10.0, 20.0, 40.0]  # Bullet-Safety-Gym's
    assert limits("OfflineCarGoal1Gymnasium-v0") == [20.0, 40.0, 80.0]  # Safety-Gymnasium's
    assert limits("OfflineCarCircle-v0", recipe_limit=15) == [15.0]  # the limit the run trained for
    assert limits("OfflineCarCircle-v0", recipe_limit=15, cost_limit=5) == [5.0]
    assert limits("OfflineCarCircle-v0", recipe_limit=15, cost_limits=[40, 0], cost_limit=5) == [40.0, 0.0]
    with pytest.raises(ValueError, match="evaluation.cost_limits"):
        limits("OfflineCarCircle-v0", cost_limits=[10, -1])


@pytest.mark.parametrize("edit, argv, expected", [
    (None, ["--bogus", "1"], "--bogus"),
    (lambda r: r.update(evalution={"episodes": 3}), [], "evalution.episodes"),
    (lambda r: r["stages"]["actor"]["model"]["init_args"].update(hidden_dimz=4), [], "hidden_dimz"),
    (lambda r: r["stages"]["reward_critic"].update(trainer={"max_stepz": 3}), [], "max_stepz"),
    (lambda r: r["stages"]["reward_critic"].update(data={"batch_sise": 3}), [], "batch_sise"),
    (lambda r: r["stages"]["actor"].update(input={}), [], "'input'"),
    (lambda r: r["stages"]["actor"]["inputs"].update(reward_critic="actor"), [], "'actor'"),
    (lambda r: r["stages"]["actor"]["inputs"].update(value_critic="reward_critic"), [], "value_critic"),
    (lambda r: r["stages"]["actor"]["model"].update(class_path="lightning_saferl.actors.Nope"), [],
     "lightning_saferl.actors.Nope"),
])
def test_recipe_mistakes_fail_before_training(tmp_path, tiny, capsys, edit, argv, expected):
    recipe = fisor_recipe(tiny)
    if edit is not None:
        edit(recipe)
    path = write_yaml(tmp_path / "r.yaml", recipe)
    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", "--config", path, "--run_dir", str(tmp_path / "run"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-saferl pipeline: error:") and expected in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_a_run_takes_the_finished_stages_of_another_run_with_the_same_config(tmp_path, tiny, capsys):
    """A sweep's cells at two limits share the stages that do not follow the limit; another seed shares none."""
    from lightning_saferl.pipeline import pipeline_main

    recipe = write_yaml(tmp_path / "recipe.yaml", {
        "algorithm": "bc_safe", "cost_limit": 0.0, "cost_limit_fields": ["stages.policy.model.init_args.cost_limit"],
        "data": {"task": "PointRobot-v0", "path": tiny, "batch_size": 16, "steps_per_epoch": 3},
        "trainer": {"max_steps": 3, "log_every_n_steps": 1, **QUIET},
        "stages": {"critic": {"model": {"class_path": "lightning_saferl.critics.RewardCritic",
                                        "init_args": {"hidden_dims": [8]}}},
                   "policy": {"model": {"class_path": "lightning_saferl.actors.BCSafe",
                                        "init_args": {"hidden_dims": [8], "cost_limit": 0.0}}}},
        "evaluation": {"episodes": 2, "num_envs": 2}})
    first, second, other_seed = tmp_path / "limit_0", tmp_path / "limit_10", tmp_path / "seed_1"
    pipeline_main(["--config", recipe, "--run_dir", str(first)], 0.0)
    capsys.readouterr()
    pipeline_main(["--config", recipe, "--run_dir", str(second)], 10.0, reuse_from=[other_seed, first])
    out = capsys.readouterr().out
    assert f"stage 'critic': the same config finished in {first}, reusing" in out
    assert "stage 'policy': the same config" not in out and "stage 'policy': BCSafe" in out
    assert (second / "critic" / "model.ckpt").read_bytes() == (first / "critic" / "model.ckpt").read_bytes()
    assert not (second / "critic" / "lightning_logs").exists()  # not trained here
    pipeline_main(["--config", recipe, "--run_dir", str(other_seed), "--seed_everything", "1"], 0.0,
                  reuse_from=[first, second])
    assert "the same config finished" not in capsys.readouterr().out
