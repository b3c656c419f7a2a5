"""Reliability through the `lightning-saferl` entry point: bad datasets and configs fail early with one line,
non-finite losses stop training and keep the last good checkpoint, killed runs resume exactly, runs repeat,
and checkpoints load without executing anything.

In-process (`lightning_saferl.cli.main`) wherever possible; subprocesses only where a process must be killed or
its exit status and stderr checked as a user sees them.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import lightning.pytorch  # noqa: F401  (before any test: its log handler then writes to the real stderr, not
# to the stderr a test captures, as for a user who sees Lightning's lines above the one error line)
import torch
import yaml

from lightning_saferl.cli import main
from lightning_saferl.command import DEBUG_HINT
from lightning_saferl.data.format import DatasetError, write_dataset
from lightning_saferl.policy import load_module

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
QUIET_ARGS = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
BC = "lightning_saferl.actors.BCAll"

HELPERS = '''
import os
import lightning.pytorch as pl


class SignalAt(pl.Callback):
    """Sends `signum` to this process after optimiser step `step`, only when SAFERL_TEST_KILL=1."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and os.environ.get("SAFERL_TEST_KILL") == "1":
            os.kill(os.getpid(), self.signum)
'''


def arrays(n=64, obs_dim=11, act_dim=2, episode=16):
    rng = np.random.default_rng(0)
    timeouts = np.zeros(n)
    timeouts[episode - 1::episode] = 1
    return {"observations": rng.normal(size=(n, obs_dim)), "next_observations": rng.normal(size=(n, obs_dim)),
            "actions": rng.uniform(-1, 1, (n, act_dim)), "rewards": rng.normal(size=n), "costs": np.zeros(n),
            "terminals": np.zeros(n), "timeouts": timeouts}


def write_raw(path, data):
    """Write arrays as given (no validation), like a hand-made or foreign file."""
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)
    return str(path)


def without(data, key):
    return {k: v for k, v in data.items() if k != key}


def with_nonfinite(data):
    data = {k: v.copy() for k, v in data.items()}
    data["rewards"][[3, 7]] = np.nan
    data["observations"][5, 2] = np.inf
    return data


def beyond_float32(data):
    """Finite float64 values that float32 cannot hold: they would train as inf."""
    data = {k: v.astype(np.float64) for k, v in data.items()}
    data["rewards"][[1, 9]] = 1e300
    data["observations"][4, 0] = -1e39
    return data


def symlink(path, target):
    path.symlink_to(target)
    return str(path)


def write_text(path, text):
    Path(path).write_text(text)
    return str(path)


def shortened(data, key, n):
    return {**data, key: data[key][:n]}


# (case, writer(path) -> path, substrings of the message)
BAD_DATASETS = [
    ("missing_key", lambda p: write_raw(p, without(arrays(), "costs")), ["missing key(s) 'costs'"]),
    ("lengths", lambda p: write_raw(p, shortened(arrays(), "rewards", 50)),
     ["different lengths", "rewards=50", "observations=64"]),
    ("obs_shape", lambda p: str(write_dataset(p, arrays(obs_dim=10))), ["expected (N, 11)", "found (64, 10)"]),
    ("act_shape", lambda p: str(write_dataset(p, arrays(act_dim=3))), ["expected (N, 2)", "found (64, 3)"]),
    ("nonfinite", lambda p: write_raw(p, with_nonfinite(arrays())),
     ["non-finite", "rewards: 2 NaN and 0 inf", "first at row 3", "observations: 0 NaN and 1 inf", "row 5"]),
    ("empty_file", lambda p: write_text(p, ""), ["empty file (0 bytes)"]),
    ("no_keys", lambda p: write_raw(p, {}), ["empty dataset", "no keys"]),
    ("not_hdf5", lambda p: write_text(p, "observations,actions\n1,2\n"), ["not a readable HDF5 file"]),
    ("strings", lambda p: write_raw(p, {**arrays(), "rewards": np.array([b"x"] * 64)}), ["as numbers"]),
    ("does_not_exist", lambda p: str(p), ["does not exist"]),
    ("float32_overflow", lambda p: write_raw(p, beyond_float32(arrays())),
     ["non-finite", "rewards: 0 NaN and 0 inf value(s) and 2 finite value(s) beyond float32's range in 2 row(s), "
      "first at row 1", "observations: 0 NaN and 0 inf value(s) and 1 finite value(s) beyond float32's range in 1 "
      "row(s), first at row 4"]),
    ("symlink_loop", lambda p: symlink(p, p), ["symlink loop"]),
    ("dangling_link", lambda p: symlink(p, p.with_name("gone.hdf5")), ["is a symbolic link to", "gone.hdf5",
                                                                       "which does not exist"]),
    ("empty_path", lambda p: "", ["data.path is empty ('')"]),
]


def run_dirs(root):
    return sorted(Path(root, "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def error_line(capsys, command):
    """The one error line, without the closing hint (which every such line has)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lightning-saferl {command}: error:") and "\n" not in err and "Traceback" not in err
    assert err.endswith(DEBUG_HINT)
    return err[:-len(DEBUG_HINT)]


def expect_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return error_line(capsys, argv[0])


@pytest.fixture
def helpers(tmp_path, monkeypatch):
    """A module with the SignalAt callback, importable here and in subprocesses (their environment)."""
    folder = tmp_path / "helpers"
    folder.mkdir()
    (folder / "saferl_test_helpers.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(folder))
    # the same number of intra-op threads as this process, so killed and reference runs compute alike
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS=str(torch.get_num_threads()))


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("data") / "good.hdf5", arrays()))


@pytest.fixture(scope="module")
def feasibility_ckpt(tmp_path_factory, good_file):
    root = tmp_path_factory.mktemp("critic")
    main(["fit", "--model", "lightning_saferl.critics.FeasibilityCritic", "--model.hidden_dims", "[4]",
          "--data.path", good_file, "--data.batch_size", "8", "--trainer.max_steps", "1",
          "--trainer.default_root_dir", str(root), *QUIET_ARGS])
    return str(run_dirs(root)[-1] / "checkpoints" / "last.ckpt")


def bc_recipe(data_path, steps=4):
    return {"algorithm": "bc_all", "data": {"path": data_path, "batch_size": 8, "steps_per_epoch": 3},
            "trainer": {"max_steps": steps, "log_every_n_steps": 1, **QUIET},
            "stages": {"policy": {"model": {"class_path": BC, "init_args": {"hidden_dims": [4]}}}},
            "evaluation": {"episodes": 1, "num_envs": 1}}


# ------------------------------------------------------------------------------------------- bad datasets
@pytest.mark.parametrize("case, writer, expected", BAD_DATASETS, ids=[c[0] for c in BAD_DATASETS])
@pytest.mark.parametrize("command", ["fit", "pipeline"])
def test_bad_dataset_fails_before_training_with_one_line(tmp_path, capsys, command, case, writer, expected):
    path = writer(tmp_path / f"{case}.hdf5")
    if command == "fit":
        argv = ["fit", "--model", BC, "--data.path", path, "--trainer.default_root_dir", str(tmp_path / "out")]
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(bc_recipe("unused.hdf5"), sort_keys=False))
        argv = ["pipeline", "--config", str(recipe), "--data.path", path, "--run_dir", str(tmp_path / "out")]
    err = expect_error(capsys, argv)
    assert path in err and all(s in err for s in expected), err
    assert not (tmp_path / "out").exists()  # no run directory, logger or checkpoint was created


@pytest.mark.parametrize("widen", [lambda a: a * 10,  # 10x the bounds
                                   lambda a: np.where(a > 0, 100, -100).astype(np.int8)],  # int8 actions of +-100
                         ids=["10x", "int8"])
def test_actions_outside_the_bounds_are_clipped_with_one_warning(tmp_path, widen):
    from lightning_saferl.data.datamodule import OfflineDataModule
    from lightning_saferl.data.format import DatasetWarning

    actions = widen(arrays()["actions"])
    path = write_raw(tmp_path / "wide.hdf5", {**arrays(), "actions": actions})
    with pytest.warns(DatasetWarning) as caught:
        data = OfflineDataModule(path=path).load()
    outside, low, high = int((np.abs(actions) > 1).sum()), np.float32(actions.min()), np.float32(actions.max())
    assert 0 < outside <= actions.size
    assert [str(w.message) for w in caught] == [
        f"{path}: {outside} of {actions.size} action value(s) lie outside the action bounds [-1, 1] (range "
        f"[{low:.4g}, {high:.4g}]) and are clipped to [-1, 1]; rescale the actions to [-1, 1] if the file's action "
        "space is wider"]
    assert data.actions.abs().max() < 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # actions within the bounds: not a word
        OfflineDataModule(path=write_raw(tmp_path / "in_bounds.hdf5", arrays())).load()


def test_debug_shows_the_exception_itself(tmp_path, monkeypatch):
    bad = write_raw(tmp_path / "bad.hdf5", with_nonfinite(arrays()))
    with pytest.raises(DatasetError, match="non-finite values"):
        main(["fit", "--model", BC, "--data.path", bad, "--debug"])
    monkeypatch.setenv("LIGHTNING_SAFERL_DEBUG", "1")
    with pytest.raises(DatasetError, match="non-finite values"):
        main(["fit", "--model", BC, "--data.path", bad])


# ------------------------------------------------------------------------------------------- bad configuration
def test_missing_critic_checkpoint_names_the_path(tmp_path, capsys, good_file, feasibility_ckpt):
    missing = str(tmp_path / "nope.ckpt")
    err = expect_error(capsys, ["fit", "--model", "lightning_saferl.actors.FisorActor",
                                "--model.feasibility_critic", feasibility_ckpt, "--model.reward_critic", missing,
                                "--data.path", good_file, "--trainer.default_root_dir", str(tmp_path)])
    assert err.endswith(f"error: RewardCritic checkpoint not found: {missing}")


def test_checkpoint_of_the_wrong_module_type(tmp_path, capsys, good_file, feasibility_ckpt):
    err = expect_error(capsys, ["fit", "--model", "lightning_saferl.actors.FisorActor",
                                "--model.feasibility_critic", feasibility_ckpt, "--model.reward_critic",
                                feasibility_ckpt, "--data.path", good_file])
    assert err.endswith(f"error: {feasibility_ckpt}: checkpoint holds a FeasibilityCritic, expected a RewardCritic")
    err = expect_error(capsys, ["test", "--model", BC, "--ckpt_path", feasibility_ckpt, "--data.path", good_file])
    assert f"{feasibility_ckpt}: checkpoint holds a FeasibilityCritic, expected a BCAll" in err


def test_missing_or_unreadable_resume_checkpoint(tmp_path, capsys, good_file, feasibility_ckpt):
    missing = str(tmp_path / "last.ckpt")
    err = expect_error(capsys, ["fit", "--model", BC, "--ckpt_path", missing, "--data.path", good_file])
    assert err.endswith(f"error: checkpoint not found: {missing}")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(Path(feasibility_ckpt).read_bytes()[:2000])
    for bad in (str(truncated), good_file):  # a cut file; a dataset passed as a checkpoint
        err = expect_error(capsys, ["fit", "--model", BC, "--ckpt_path", bad, "--data.path", good_file])
        assert f"error: {bad}: not a readable PyTorch checkpoint" in err


# ------------------------------------------------------------------------------------------- safe loading
def test_forged_class_tags_are_refused(tmp_path, capsys, good_file, feasibility_ckpt):
    checkpoint = torch.load(feasibility_ckpt, weights_only=True)
    for tag, message in (("os.system", "which is not a lightning_saferl module; refusing to load it"),
                         ("lightning_saferl.cli.main", "unknown class"),
                         ("lightning_saferl.no_such_module.Cls", "unknown class")):
        forged = str(tmp_path / "forged.ckpt")
        torch.save({**checkpoint, "lightning_saferl_class": tag}, forged)
        err = expect_error(capsys, ["test", "--ckpt_path", forged, "--data.path", good_file])
        assert f"{forged}: checkpoint names" in err and repr(tag) in err and message in err
        err = expect_error(capsys, ["fit", "--model", "lightning_saferl.actors.FisorActor",
                                    "--model.feasibility_critic", forged, "--data.path", good_file])
        assert repr(tag) in err and message in err


OPEN = f"{open.__module__}.{open.__qualname__}"  # as pickle names it: io.open (Python 3.11), _io.open (3.12)


class _OpensAFile:
    """Unpickling this object would create a file: the stand-in for arbitrary code in a checkpoint."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (self.target, "w")


def test_pickled_code_in_a_checkpoint_is_not_executed(tmp_path, capsys, good_file, feasibility_ckpt):
    marker = tmp_path / "executed"
    evil = str(tmp_path / "evil.ckpt")
    checkpoint = torch.load(feasibility_ckpt, weights_only=True)
    torch.save({**checkpoint, "payload": _OpensAFile(str(marker))}, evil)
    for argv in (["test", "--ckpt_path", evil, "--data.path", good_file],
                 ["fit", "--model", BC, "--ckpt_path", evil, "--data.path", good_file],
                 ["fit", "--model", "lightning_saferl.actors.FisorActor", "--model.feasibility_critic", evil,
                  "--data.path", good_file]):
        err = expect_error(capsys, argv)
        assert err.endswith(f"error: {evil}: refused to load: the checkpoint holds GLOBAL {OPEN}, which "
                            "weights_only=True does not allow (nothing in it was executed)")
    with pytest.raises(ValueError, match="refused to load"):
        load_module(evil)
    assert not marker.exists()


class _RunsAShell:
    """Unpickling this object would call os.system, whose module torch's restricted unpickler blocks outright."""

    def __reduce__(self):
        return os.system, ("true",)


def test_a_checkpoint_holding_a_blocked_global_is_refused_as_such(tmp_path, capsys, good_file, feasibility_ckpt):
    evil = str(tmp_path / "evil.ckpt")
    torch.save({**torch.load(feasibility_ckpt, weights_only=True), "payload": _RunsAShell()}, evil)
    err = expect_error(capsys, ["test", "--ckpt_path", evil, "--data.path", good_file])
    assert err.endswith(f"error: {evil}: refused to load: the checkpoint holds GLOBAL {os.system.__module__}.system, "
                        "an object that weights_only=True refuses (nothing in it was executed)"), err


# ------------------------------------------------------------------------------------------- numerical faults
def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, capsys, good_file):
    # lr 1e12: after one Adam step every weight is ~1e12 and the next loss overflows float32
    err = expect_error(capsys, ["fit", "--model", "lightning_saferl.critics.RewardCritic", "--model.lr", "1e12",
                                "--model.hidden_dims", "[8]", "--data.path", good_file, "--data.batch_size", "8",
                                "--last_checkpoint.every_n_train_steps", "1", "--trainer.max_steps", "50",
                                "--trainer.default_root_dir", str(tmp_path), *QUIET_ARGS])
    last = run_dirs(tmp_path)[-1] / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["global_step"]
    assert "RewardCritic: loss 'value_loss' is inf at step 1;" in err
    assert err.endswith(f"Last good checkpoint: {last} (step {saved})") and saved == 1
    critic = load_module(str(last))  # loadable, finite weights
    assert all(torch.isfinite(p).all() for p in critic.parameters())


def test_non_finite_loss_in_a_pipeline_names_the_stage(tmp_path, capsys):
    huge = {**arrays(), "rewards": np.full(64, 3e38)}  # finite, but (Q - r)^2 overflows
    path = str(write_dataset(tmp_path / "huge.hdf5", huge))
    recipe = bc_recipe(path)
    recipe["stages"] = {"critic": {"model": {"class_path": "lightning_saferl.critics.RewardCritic",
                                             "init_args": {"hidden_dims": [4]}}}, **recipe["stages"]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    err = expect_error(capsys, ["pipeline", "--config", str(tmp_path / "r.yaml"), "--run_dir", str(tmp_path / "run")])
    assert "error: stage 'critic': RewardCritic: loss 'q_loss' is inf at step 0;" in err
    assert not list((tmp_path / "run" / "critic").rglob("last.ckpt"))
    assert not (tmp_path / "run" / "critic" / "model.ckpt").exists()


# ------------------------------------------------------------------------------------------- no lost work
def fit_config(tmp_path, data_path, kill_step, signum):
    config = {"model": {"class_path": "lightning_saferl.critics.RewardCritic",
                        "init_args": {"hidden_dims": [8], "lr": 0.01}},
              "data": {"init_args": {"path": data_path, "batch_size": 8, "steps_per_epoch": 4}},
              "trainer": {"max_steps": 10, "log_every_n_steps": 1, **QUIET,
                          "callbacks": [{"class_path": "saferl_test_helpers.SignalAt",
                                         "init_args": {"step": kill_step, "signum": int(signum)}}]},
              "last_checkpoint": {"every_n_train_steps": 100}}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def assert_same_training_state(a, b):
    assert a["global_step"] == b["global_step"]
    assert a["OfflineDataModule"] == b["OfflineDataModule"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("q_target.") for k in a["state_dict"]) or any(k.startswith("policy.") for k in a["state_dict"])
    for key in a["state_dict"]:  # weights and target networks
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=1e-6)
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for key in ("step", "exp_avg", "exp_avg_sq"):  # Adam moments
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-6)


def test_sigterm_saves_state_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, helpers, good_file):
    config = fit_config(tmp_path, good_file, kill_step=5, signum=signal.SIGTERM)
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-m", "lightning_saferl.cli", "fit", "--config", config,
                           "--trainer.default_root_dir", str(killed)], capture_output=True, text=True,
                          env={**helpers, "SAFERL_TEST_KILL": "1"}, timeout=300)
    last = run_dirs(killed)[0] / "checkpoints" / "last.ckpt"
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"lightning-saferl fit: stopped by SIGTERM; state saved to {last} (step 5): pass it as --ckpt_path to resume")
    assert torch.load(last, weights_only=True)["global_step"] == 5  # not the periodic one: every 100 steps
    main(["fit", "--config", str(last.parent.parent / "config.yaml"), "--ckpt_path", str(last),
          "--trainer.default_root_dir", str(killed)])
    main(["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path / "reference")])
    resumed = torch.load(run_dirs(killed)[-1] / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(run_dirs(tmp_path / "reference")[-1] / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 10 and resumed["OfflineDataModule"]["batches_drawn"] == 10
    assert_same_training_state(resumed, reference)


def test_sigterm_of_a_one_stage_pipeline_says_to_rerun_the_same_command(tmp_path, helpers, good_file):
    recipe = bc_recipe(good_file, steps=8)
    recipe["stages"]["policy"]["trainer"] = {"callbacks": [{"class_path": "saferl_test_helpers.SignalAt",
                                                            "init_args": {"step": 3, "signum": int(signal.SIGTERM)}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    argv = [sys.executable, "-m", "lightning_saferl.cli", "pipeline", "--config", str(path), "--run_dir",
            str(tmp_path / "run")]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**helpers, "SAFERL_TEST_KILL": "1"}, timeout=300)
    last = tmp_path / "run" / "policy" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"lightning-saferl pipeline: stopped by SIGTERM; state saved to {last} (step 3); rerun the same command to "
        "resume")
    proc = subprocess.run(argv, capture_output=True, text=True, env=helpers, timeout=300)  # as the message says
    assert proc.returncode == 0 and f"resuming from {last}" in proc.stdout, proc.stderr[-2000:]


def test_sigkill_pipeline_resumes_skipping_finished_stages(tmp_path, helpers, good_file, capsys, monkeypatch):
    recipe = bc_recipe(good_file, steps=8)
    recipe["checkpoint_every_n_steps"] = 2
    recipe["stages"] = {"critic": {"model": {"class_path": "lightning_saferl.critics.RewardCritic",
                                             "init_args": {"hidden_dims": [4]}}, "trainer": {"max_steps": 3}},
                        **recipe["stages"]}
    recipe["stages"]["policy"]["trainer"] = {"callbacks": [{"class_path": "saferl_test_helpers.SignalAt",
                                                            "init_args": {"step": 5, "signum": int(signal.SIGKILL)}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lightning_saferl.cli", "pipeline", "--config", str(path),
                           "--run_dir", str(run)], capture_output=True, text=True,
                          env={**helpers, "SAFERL_TEST_KILL": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / "critic" / "model.ckpt").exists() and not (run / "policy" / "model.ckpt").exists()
    last = run / "policy" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4  # the periodic checkpoint before the kill
    critic_mtime = (run / "critic" / "model.ckpt").stat().st_mtime_ns

    calls = []  # every checkpoint read while resuming must be weights_only=True
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    main(["pipeline", "--config", str(path), "--run_dir", str(run)])
    out = capsys.readouterr().out
    assert "stage 'critic': finished earlier" in out and f"resuming from {last}" in out
    assert calls and all(w is True for w in calls)
    assert (run / "critic" / "model.ckpt").stat().st_mtime_ns == critic_mtime  # not trained again
    main(["pipeline", "--config", str(path), "--run_dir", str(tmp_path / "reference")])
    resumed = real_load(run / "policy" / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt",
                        weights_only=True)  # the resumed run: a new run directory, as with `fit --ckpt_path`
    reference = real_load(tmp_path / "reference" / "policy" / "lightning_logs" / "version_0" / "checkpoints" /
                          "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 8
    assert_same_training_state(resumed, reference)
    assert json.loads((run / "summary.json").read_text())["return_mean"] == pytest.approx(
        json.loads((tmp_path / "reference" / "summary.json").read_text())["return_mean"])


# ------------------------------------------------------------------------------------------- reproducibility
def test_same_config_and_seed_give_identical_losses_and_evaluation(tmp_path, good_file):
    recipe = {"algorithm": "fisor", "seed_everything": 3,
              "data": {"path": good_file, "batch_size": 8, "steps_per_epoch": 40},
              "trainer": {"max_steps": 100, "log_every_n_steps": 1, **QUIET},
              "stages": {
                  "feasibility_critic": {"model": {"class_path": "lightning_saferl.critics.FeasibilityCritic",
                                                   "init_args": {"hidden_dims": [8]}},
                                         "trainer": {"max_steps": 30}},
                  "reward_critic": {"model": {"class_path": "lightning_saferl.critics.RewardCritic",
                                              "init_args": {"hidden_dims": [8]}},
                                    "trainer": {"max_steps": 30}},
                  # dropout, noise levels and noise: the actor's losses depend on the seeded global generator
                  "actor": {"model": {"class_path": "lightning_saferl.actors.FisorActor",
                                      "init_args": {"hidden_dim": 8, "num_blocks": 1, "num_candidates": 3}},
                            "inputs": {"feasibility_critic": "feasibility_critic", "reward_critic": "reward_critic"}}},
              "evaluation": {"episodes": 2, "num_envs": 2}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        main(["pipeline", "--config", str(tmp_path / "r.yaml"), "--run_dir", str(run)])

    def losses(run, stage):
        rows = csv.DictReader(open(run / stage / "lightning_logs" / "version_0" / "metrics.csv"))
        return [(int(r["step"]), r["loss"]) for r in rows if r.get("loss")]

    for stage, steps in (("feasibility_critic", 30), ("reward_critic", 30), ("actor", 100)):
        first = losses(runs[0], stage)
        assert len(first) == steps and first == losses(runs[1], stage)  # exact, as written to the CSV
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    for summary in summaries:
        summary.pop("minutes")
    assert summaries[0] == summaries[1]
    assert json.loads((runs[0] / "run_info.json").read_text())["seed"] == 3
    assert yaml.safe_load((runs[0] / "config.yaml").read_text())["seed_everything"] == 3


# ------------------------------------------------------------------------------------------- errors that are bugs
def test_a_bug_keeps_its_traceback(tmp_path, good_file, monkeypatch):
    """Only the project's input errors become one line; a TypeError from a bug propagates."""
    def bug(cfg, cost_limit=None):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr("lightning_saferl.pipeline.plan.resolve_cost_limit", bug)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(bc_recipe(good_file), sort_keys=False))
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["pipeline", "--config", str(recipe), "--run_dir", str(tmp_path / "run")])


def test_a_constructor_rejecting_its_configured_arguments_is_one_line(tmp_path, capsys, good_file):
    err = expect_error(capsys, ["fit", "--model", "lightning_saferl.actors.DrcorlPolicy", "--model.cost_slack", "-1",
                                "--data.path", good_file, "--trainer.default_root_dir", str(tmp_path)])
    assert "DrcorlPolicy: need cost_slack >= 0" in err


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*point_robot.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_negative_cost_limit_is_refused_before_training_by_every_recipe(tmp_path, capsys, good_file, recipe):
    err = expect_error(capsys, ["pipeline", "--config", str(CONFIGS / recipe), "--data.path", good_file,
                                "--run_dir", str(tmp_path / "run"), "--cost_limit", "-5"])
    assert err.endswith("error: cost_limit: expected one or more finite cost limits >= 0, got -5.0"), err
    assert not (tmp_path / "run").exists()


BC_SAFE = "lightning_saferl.actors.BCSafe"
# (case, the last stage's model class (None: BCAll), command-line arguments, the message); each is refused before
# the first stage trains
BAD_VALUES = [
    ("evaluation_cost_limits", None, ["--evaluation.cost_limits", "[10, -1]"],
     "evaluation.cost_limits: expected one or more finite cost limits >= 0, got [10.0, -1.0]"),
    ("stage_cost_limit", BC_SAFE, ["--stages.policy.model.init_args.cost_limit", "-5"],
     "stage 'policy': BCSafe: cost_limit must be a finite cost budget >= 0, got -5.0"),
    ("target_cost", "lightning_saferl.actors.CDT", ["--stages.policy.model.init_args.target_cost", "-1",
                                                    "--data.sequence_length", "4"],
     "stage 'policy': CDT: target_cost must be a finite cost budget >= 0, got -1.0"),
    ("lr", None, ["--stages.policy.model.init_args.lr", "-1"], "stage 'policy': BCAll: lr must be > 0, got -1.0"),
    ("actor_lr", "lightning_saferl.actors.CPQ", ["--stages.policy.model.init_args.actor_lr", "0"],
     "stage 'policy': CPQ: actor_lr must be > 0, got 0.0"),
    ("constructor", "lightning_saferl.actors.DrcorlPolicy", ["--stages.policy.model.init_args.cost_slack", "-1"],
     "stage 'policy': DrcorlPolicy: need cost_slack >= 0"),
    ("max_steps_0", None, ["--stages.policy.trainer.max_steps", "0"],
     "stage 'policy': trainer.max_steps is 0: nothing would be trained; give a positive number"),
    ("max_epochs_0", None, ["--stages.policy.trainer.max_steps", "-1", "--stages.policy.trainer.max_epochs", "0"],
     "stage 'policy': trainer.max_epochs is 0: nothing would be trained; give a positive number"),
    ("forever", None, ["--stages.policy.trainer.max_steps", "-1", "--stages.policy.trainer.max_epochs", "-1"],
     "stage 'policy': trainer.max_steps -1 with max_epochs -1 trains forever; set max_steps, max_epochs or max_time"),
    ("max_steps_-2", None, ["--stages.policy.trainer.max_steps", "-2"],
     "stage 'policy': trainer.max_steps must be > 0 (or -1: follow max_epochs), got -2"),
]


@pytest.mark.parametrize("case, model, argv, expected", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_values_refused_later_are_refused_before_training(tmp_path, capsys, good_file, case, model, argv, expected):
    recipe = bc_recipe(good_file)
    recipe["stages"] = {"critic": {"model": {"class_path": "lightning_saferl.critics.RewardCritic",
                                             "init_args": {"hidden_dims": [4]}}}, **recipe["stages"]}
    if model is not None:
        recipe["stages"]["policy"]["model"] = {"class_path": model, "init_args": {}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    err = expect_error(capsys, ["pipeline", "--config", str(path), "--run_dir", str(tmp_path / "run"), *argv])
    assert f"error: {expected}" in err, err
    assert not (tmp_path / "run").exists()  # not even the first stage started


def test_fit_refuses_the_same_values_before_training(tmp_path, capsys, good_file):
    base = ["fit", "--model", BC, "--data.path", good_file, "--trainer.default_root_dir", str(tmp_path / "out")]
    err = expect_error(capsys, [*base, "--model.lr", "-1"])
    assert err.endswith("error: BCAll: lr must be > 0, got -1.0"), err
    err = expect_error(capsys, [*base, "--trainer.max_steps", "0"])
    assert err.endswith("error: trainer.max_steps is 0: nothing would be trained; give a positive number"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["model", "callback", "command_line"])
def test_a_class_path_outside_the_project_runs_no_module_that_lacks_it(tmp_path, capsys, good_file, where):
    """`this` prints the Zen of Python when imported: a recipe naming `this.Nothing` must not import it."""
    assert "this" not in sys.modules
    recipe = bc_recipe(good_file)
    policy = recipe["stages"]["policy"]
    argv = []
    if where == "model":
        policy["model"]["class_path"] = "this.Nothing"
    elif where == "callback":
        policy["trainer"] = {"callbacks": [{"class_path": "this.Nothing"}]}
    else:
        argv = ["--stages.policy.model.class_path", "this.Nothing"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    err = expect_error(capsys, ["pipeline", "--config", str(path), "--run_dir", str(tmp_path / "run"), *argv])
    assert "no class 'Nothing' found in the source of module 'this' (the module was not imported)" in err, err
    assert "this" not in sys.modules and "Beautiful is better than ugly" not in capsys.readouterr().out


def test_help_does_not_import_lightning():
    code = ("import sys; from lightning_saferl.cli import main; main(['--help']); "
            "print('LOADED' if 'lightning' in sys.modules else 'NOT LOADED')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "NOT LOADED", proc.stderr[-2000:]


def test_collect_options_use_underscores_and_an_unknown_task_is_one_line(tmp_path, capsys):
    for num_envs in ("--num_envs", "--num-envs"):  # the dashed spelling still works
        out = tmp_path / f"{num_envs}.hdf5"
        main(["collect", "--out", str(out), "--steps", "40", num_envs, "4", "--no_progress"])
        with h5py.File(out) as f:
            assert len(f["rewards"]) == 40
    err = expect_error(capsys, ["collect", "--task", "PointRobot-v9", "--out", str(tmp_path / "x.hdf5")])
    assert "unknown task id 'PointRobot-v9'" in err and "PointRobot-v0" in err


def test_fit_on_a_dsrl_task_not_cached_downloads_before_building_the_model(tmp_path, monkeypatch):
    """The model's dims come from the file, which is fetched (here: a fake download of a local file) first."""
    from lightning_saferl.data.datamodule import OfflineDataModule
    from lightning_saferl.data.tasks import get_task

    spec = get_task("OfflineCarCircle-v0")
    source = str(write_dataset(tmp_path / "source.hdf5", arrays(n=64, obs_dim=7, act_dim=3)))
    cache = tmp_path / "dsrl"
    monkeypatch.setenv("DSRL_DATASET_DIR", str(cache))
    fetched = []

    def fake_download(self):
        target = cache / spec.dataset_file
        if not target.exists():
            fetched.append(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(source).read_bytes())
        return target

    monkeypatch.setattr(OfflineDataModule, "dataset_path", fake_download)
    main(["fit", "--model", BC, "--model.hidden_dims", "[4]", "--data.task", spec.task_id,
          "--data.batch_size", "8", "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "out"),
          *QUIET_ARGS])
    hparams = torch.load(run_dirs(tmp_path / "out")[-1] / "checkpoints" / "last.ckpt",
                         weights_only=True)["hyper_parameters"]
    assert fetched and (hparams["obs_dim"], hparams["act_dim"]) == (7, 3)


# ------------------------------------------------------------------------------------------- stage workers
def parallel_recipe(data_path, critic_steps):
    """Two critics that train at once in stage workers (--parallel_stages 2), then an actor fed by both."""
    critic = {"init_args": {"hidden_dims": [4]}}
    return {"algorithm": "fisor", "data": {"path": data_path, "batch_size": 8, "steps_per_epoch": 50},
            "trainer": {"max_steps": critic_steps, "log_every_n_steps": 50, **QUIET},
            "checkpoint_every_n_steps": 10 ** 6, "parallel_stages": 2,
            "stages": {
                "feasibility_critic": {"model": {"class_path": "lightning_saferl.critics.FeasibilityCritic", **critic}},
                "reward_critic": {"model": {"class_path": "lightning_saferl.critics.RewardCritic", **critic}},
                "actor": {"model": {"class_path": "lightning_saferl.actors.FisorActor",
                                    "init_args": {"hidden_dim": 8, "num_blocks": 1, "num_candidates": 2}},
                          "trainer": {"max_steps": 2},
                          "inputs": {"feasibility_critic": "feasibility_critic", "reward_critic": "reward_critic"}}},
            "evaluation": {"episodes": 1, "num_envs": 1}}


def alive(pid):
    """Whether process `pid` still runs (a zombie waiting for its parent to reap it counts as ended)."""
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:3] + " "
    except FileNotFoundError:
        return False


def wait_until(condition, seconds, what):
    import time

    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"gave up after {seconds} s waiting for {what}"
        time.sleep(0.2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_killing_a_pipeline_ends_its_stage_workers(tmp_path, good_file, signum):
    """However the pipeline process ends, its stage workers stop too (each saving its last.ckpt), not training on
    with parent 1; SIGTERM says how to resume."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(parallel_recipe(good_file, critic_steps=10 ** 7), sort_keys=False))
    run, log = tmp_path / "run", tmp_path / "out.txt"
    with open(log, "w") as out:
        pipeline = subprocess.Popen([sys.executable, "-m", "lightning_saferl.cli", "pipeline", "--config",
                                     str(recipe), "--run_dir", str(run)], stdout=out, stderr=subprocess.PIPE,
                                    text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    try:
        def worker_pids():
            return [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines()
                    if "threads in process" in line]

        wait_until(lambda: len(worker_pids()) == 2 or pipeline.poll() is not None, 240, "two stage workers")
        workers = worker_pids()
        assert len(workers) == 2 and pipeline.pid not in workers, log.read_text()[-2000:]
        wait_until(lambda: len(list(run.glob("*/lightning_logs/version_0/metrics.csv"))) == 2, 120,
                   "both stages training")
        pipeline.send_signal(signum)
        err = pipeline.communicate(timeout=180)[1]
        wait_until(lambda: not any(alive(pid) for pid in workers), 120, "the workers to end")
    finally:
        pipeline.kill()
    for stage in ("feasibility_critic", "reward_critic"):  # stopped by SIGTERM: state saved (not the periodic one)
        assert torch.load(run / stage / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                          weights_only=True)["global_step"] > 0
    if signum == signal.SIGTERM:
        assert pipeline.returncode == 143, err[-2000:]
        assert err.strip().splitlines()[-1] == \
            "lightning-saferl pipeline: stopped by SIGTERM; rerun the same command to resume"


HOLD_STAGE = """
import sys, time
from pathlib import Path
from lightning_saferl.pipeline.locks import stage_lock
with stage_lock(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
def test_a_rerun_cannot_start_while_an_orphaned_worker_holds_a_stage(tmp_path, capsys, good_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(parallel_recipe(good_file, critic_steps=2), sort_keys=False))
    run = tmp_path / "run"
    argv = ["pipeline", "--config", str(recipe), "--run_dir", str(run), "--parallel_stages", "1"]
    orphan = subprocess.Popen([sys.executable, "-c", HOLD_STAGE, str(run / "reward_critic")], stdout=subprocess.PIPE,
                              text=True)  # a stage worker training on after its pipeline ended
    try:
        assert orphan.stdout.readline().strip() == "holding"
        err = expect_error(capsys, argv)
        assert err.endswith(f"error: stage 'reward_critic' of {run} is still being trained by pid {orphan.pid} on "
                            f"{os.uname().nodename}, a stage worker whose pipeline ended; wait for it to stop (it "
                            "saves its last.ckpt) or end it, then rerun the same command"), err
        assert not list(run.glob("*/lightning_logs"))  # nothing trained
    finally:
        orphan.kill()
        orphan.wait()
    main(argv)  # the stage is free: the same command goes ahead
    assert (run / "actor" / "model.ckpt").exists()


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_the_lock_never_writes_through_a_link(tmp_path, capsys, good_file, link):
    precious = tmp_path / "precious.txt"
    precious.write_text("not a lock")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".pipeline.lock").symlink_to(precious) if link == "symlink" else os.link(precious, run / ".pipeline.lock")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(bc_recipe(good_file), sort_keys=False))
    err = expect_error(capsys, ["pipeline", "--config", str(recipe), "--run_dir", str(run)])
    lock = run / ".pipeline.lock"
    assert err.endswith(f"error: {lock} is a symbolic link; a lock file is never written through a link: remove the "
                        "link and rerun" if link == "symlink" else
                        f"error: {lock} is not a regular file of its own (2 hard links); a lock file is never written "
                        "into another file: remove it and rerun"), err
    assert precious.read_text() == "not a lock" and not (run / "policy").exists()


# ------------------------------------------------------------------------------------------- declared dependencies
def test_every_benchmark_import_is_declared_in_the_dev_and_bench_extras():
    """`pip install -e ".[dev]"` (or ".[bench]") installs whatever a benchmark imports."""
    import ast
    import importlib.metadata as md
    import re

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[\[<>=~!; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    distributions = md.packages_distributions()
    imported = set()
    for script in (root / "benchmarks").glob("*.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "lightning_saferl"}
    assert {"torch", "scipy", "ray"} <= third_party
    for extra in ("dev", "bench"):
        declared = names(project["dependencies"]) | names(project["optional-dependencies"][extra])
        missing = {m for m in third_party
                   if not names(distributions.get(m, [m])) & declared}
        assert not missing, f"benchmarks import {sorted(missing)}, which neither the dependencies nor [{extra}] install"
