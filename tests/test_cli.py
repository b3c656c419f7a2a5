"""`lightning-saferl fit | validate | test` (LightningCLI): parsing, linking, defaults, critics from YAML, resume.

Every run is in-process (`lightning_saferl.cli.main`) on a tiny dataset with tiny networks and a few steps.
"""
import csv
import json

import pytest
import torch
import yaml

from lightning_saferl import runs
from lightning_saferl.cli import main
from tiny_data import write_tiny

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def run_dirs(root):
    return sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def fit(root, *args):
    main(["fit", *args, "--trainer.default_root_dir", str(root), *QUIET])  # after a --config: overrides it
    return run_dirs(root)[-1]


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """Checkpoints of a feasibility critic, a reward critic and a BC policy, each from a 4-step `fit`."""
    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for name, cls in (("feasibility", "lightning_saferl.critics.FeasibilityCritic"),
                      ("reward", "lightning_saferl.critics.RewardCritic"),
                      ("policy", "lightning_saferl.actors.BCAll")):
        runs[name] = fit(root / name, "--model", cls, "--model.hidden_dims", "[8]", "--data.path", tiny,
                         "--data.batch_size", "16", "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
                         "--last_checkpoint.every_n_train_steps", "2")
    return runs


def test_fit_links_dims_and_writes_run_record(trained):
    run = trained["feasibility"]
    last = ckpt(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and last["OfflineDataModule"]["batches_drawn"] == 4
    assert last["lightning_saferl_class"] == "lightning_saferl.critics.modules.FeasibilityCritic"
    assert (last["hyper_parameters"]["obs_dim"], last["hyper_parameters"]["act_dim"]) == (11, 2)  # linked
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["seed_everything"] == 0 and config["weights_only"] is True
    assert config["data"]["class_path"].endswith("OfflineDataModule")  # the default data class
    info = json.loads((run / "run_info.json").read_text())
    assert info["seed"] == 0 and info["versions"]["torch"] == torch.__version__
    assert info["command"][:2] == ["lightning-saferl", "fit"]
    # both default loggers write into the run directory
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("train/q_loss")] == [0, 1, 2, 3]
    assert list(run.glob("events.out.tfevents.*"))


def test_dims_come_from_the_dataset_of_a_dsrl_task(tmp_path):
    data = write_tiny(tmp_path / "car.hdf5", n=60, obs_dim=7, act_dim=3, episode=30)
    run = fit(tmp_path, "--model", "lightning_saferl.actors.BCAll", "--model.hidden_dims", "[4]",
              "--data.task", "OfflineCarCircle-v0", "--data.path", data, "--trainer.max_steps", "1")
    hparams = ckpt(run / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert (hparams["obs_dim"], hparams["act_dim"]) == (7, 3)


def test_print_config_composes_files_in_order(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_saferl.actors.BCAll", "init_args": {"lr": 0.1, "hidden_dims": [3]}},
        "trainer": {"max_steps": 7}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"lr": 0.2}}}))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml"),
              "--trainer.max_steps", "9", "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["lr"] == 0.2  # the later file wins
    assert printed["model"]["init_args"]["hidden_dims"] == [3]  # kept from the first file
    assert printed["trainer"]["max_steps"] == 9  # the command line wins over both
    assert "obs_dim" not in printed["model"]["init_args"]  # linked from the data, not an option
    assert printed["last_checkpoint"]["every_n_train_steps"] == 1000
    assert printed["weights_only"] is True


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_fit_configs_read_like_recipes(tmp_path, capsys, monkeypatch, native, expected):
    # OmegaConf mode, as pipeline recipes: interpolation and the project's resolvers (a recipe's stage block works)
    monkeypatch.setattr(runs, "native_bf16_cpu", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "a.yaml").write_text("model:\n  class_path: lightning_saferl.actors.BCAll\n"
                                     "trainer:\n  max_steps: 7\n  precision: ${bf16_if_native_cpu:}\n"
                                     "  log_every_n_steps: ${trainer.max_steps}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(tmp_path / "a.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["precision"] == expected and printed["trainer"]["log_every_n_steps"] == 7


def test_fisor_actor_with_critic_checkpoints_from_yaml(tmp_path, tiny, trained):
    (tmp_path / "actor.yaml").write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_saferl.actors.FisorActor", "init_args": {
            "feasibility_critic": str(trained["feasibility"] / "checkpoints" / "last.ckpt"),
            "reward_critic": str(trained["reward"] / "checkpoints" / "last.ckpt"),
            "hidden_dim": 8, "num_blocks": 1, "num_candidates": 2}},
        "data": {"init_args": {"path": tiny, "batch_size": 16}},
        "trainer": {"max_steps": 2}}))
    run = fit(tmp_path, "--config", str(tmp_path / "actor.yaml"))
    last = ckpt(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2
    # the critics travel inside the actor's checkpoint, with their own hyperparameters
    assert last["critic_hparams"]["feasibility_critic"]["hidden_dims"] == [8]
    assert "hidden_dim" not in last["critic_hparams"]["reward_critic"]
    assert any(k.startswith("feasibility_critic.") for k in last["state_dict"])
    assert any(k.startswith("ema.") for k in last["state_dict"])  # the EMA copy resumes with the run


def test_test_subcommand_runs_rollouts_of_a_policy_checkpoint(tmp_path, tiny, trained):
    # no --model: the class is read from the checkpoint
    main(["test", "--ckpt_path", str(trained["policy"] / "checkpoints" / "last.ckpt"), "--data.path", tiny,
          "--trainer.default_root_dir", str(tmp_path), *QUIET])
    rows = list(csv.DictReader(open(run_dirs(tmp_path)[-1] / "metrics.csv")))
    metrics = {k: float(v) for row in rows for k, v in row.items() if v}
    assert metrics["test/rollout_episodes"] == 20
    assert 0 <= metrics["test/rollout_violation_free_fraction"] <= 1
    assert "test/bc_loss" in metrics


def test_validate_subcommand(tmp_path, tiny, trained):
    main(["validate", "--model", "lightning_saferl.critics.RewardCritic", "--ckpt_path",
          str(trained["reward"] / "checkpoints" / "last.ckpt"), "--data.path", tiny,
          "--trainer.default_root_dir", str(tmp_path), *QUIET])
    rows = list(csv.DictReader(open(run_dirs(tmp_path)[-1] / "metrics.csv")))
    assert any(row.get("val/q_loss") for row in rows)


def test_resume_continues_step_count_and_sampler(tmp_path, trained):
    run = trained["policy"]
    resumed = fit(tmp_path, "--config", str(run / "config.yaml"), "--ckpt_path",
                  str(run / "checkpoints" / "last.ckpt"), "--trainer.max_steps", "7")
    last = ckpt(resumed / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 7
    assert last["OfflineDataModule"]["batches_drawn"] == 7
    steps = [int(r["step"]) for r in csv.DictReader(open(resumed / "metrics.csv")) if r.get("train/bc_loss")]
    assert steps == [4, 5, 6]  # continues after the 4 steps of the first run
    before = ckpt(run / "checkpoints" / "last.ckpt")
    assert before["optimizer_states"][0]["state"][0]["step"] == 4
    assert last["optimizer_states"][0]["state"][0]["step"] == 7  # Adam moments carried over, not restarted


def test_unknown_options_are_errors_naming_them(tmp_path, capsys):
    base = ["fit", "--model", "lightning_saferl.actors.BCAll", "--trainer.default_root_dir", str(tmp_path)]
    for extra, name in ((["--model.init_args.hidden_dimz", "[4]"], "hidden_dimz"),
                        (["--trainer.max_stepz", "3"], "max_stepz"), (["--bogus", "1"], "bogus")):
        with pytest.raises(SystemExit) as exit_:
            main(base + extra)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lightning-saferl fit: error:") and name in err and "\n" not in err
    assert not (tmp_path / "lightning_logs").exists()


def test_bad_values_in_modules_and_commands_are_one_line_errors(tmp_path, capsys):
    """Values checked inside the library (not by the argument parser) end as one line and exit 2, no traceback."""
    for argv, name in ((["collect", "--out", str(tmp_path / "x.hdf5"), "--steps", "0"], "steps=0"),
                       (["fit", "--model", "lightning_saferl.actors.FisorActor", "--model.init_args.obs_dim", "11",
                         "--model.init_args.act_dim", "2", "--model.init_args.select_tolerance", "-1",
                         "--trainer.default_root_dir", str(tmp_path)], "select_tolerance")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err
        last = err.splitlines()[-1]  # after the seed's log line, the one-line error
        assert last.startswith(f"lightning-saferl {argv[0]}: error:") and name in last
    assert not (tmp_path / "x.hdf5").exists()


def test_one_table_of_commands_and_lightning_s_own_subcommands(capsys):
    from lightning.pytorch.cli import LightningCLI

    from lightning_saferl.cli import COMMANDS

    passed_with_name = {name for name, (_, _, with_name) in COMMANDS.items() if with_name}
    assert passed_with_name == set(LightningCLI.subcommands())  # the ones lightning_cli parses
    for name, (module, function, _) in COMMANDS.items():
        assert callable(getattr(__import__(module, fromlist=[function]), function)), name
    with pytest.raises(SystemExit) as stop:
        main(["fitt"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("lightning-saferl fitt: error: unknown command 'fitt'; choose from "
                                                   + ", ".join(COMMANDS))
