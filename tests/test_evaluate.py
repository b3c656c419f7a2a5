"""`lightning-saferl evaluate`: a trained actor's episodes, their metrics and the picture of their paths."""
import json

import numpy as np
import pytest

from lightning_saferl import evaluate as evaluate_module
from lightning_saferl.cli import main
from tiny_data import write_tiny

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def actor_ckpt(tmp_path_factory):
    """A BC-All checkpoint from a 2-step `fit` on a tiny PointRobot-shaped file."""
    root = tmp_path_factory.mktemp("evaluate")
    data = write_tiny(root / "tiny.hdf5")
    main(["fit", "--model", "lightning_saferl.actors.BCAll", "--model.hidden_dims", "[8]", "--data.path", data,
          "--data.batch_size", "16", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root), *QUIET])
    return str(next((root / "lightning_logs").glob("version_*/checkpoints/last.ckpt")))


def test_plot_draws_one_path_per_episode_with_its_steps(actor_ckpt, tmp_path, monkeypatch, capsys):
    figures = []
    plot = evaluate_module.plot_trajectories
    monkeypatch.setattr(evaluate_module, "plot_trajectories", lambda *a, **k: figures.append(plot(*a, **k)))
    out = tmp_path / "pics" / "trajectories.png"
    main(["evaluate", "--ckpt", actor_ckpt, "--episodes", "5", "--num_envs", "2", "--random_start",
          "--plot", str(out)])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = [line for line in figures[0].axes[0].lines if line.get_gid() == "path"]
    assert len(paths) == metrics["episodes"] == 5
    steps = [len(line.get_xdata()) - 1 for line in paths]  # a path holds the start and one point per step
    assert np.mean(steps) == pytest.approx(metrics["length_mean"])
    starts = {(line.get_xdata()[0], line.get_ydata()[0]) for line in paths}
    assert len(starts) == 5  # random starts: five different episodes, none drawn twice


def test_same_seed_same_episodes(actor_ckpt, capsys):
    runs = []
    for _ in range(2):
        main(["evaluate", "--ckpt", actor_ckpt, "--episodes", "3", "--random_start", "--seed", "7"])
        runs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert runs[0] == runs[1]


def test_plot_of_a_task_without_one_is_a_one_line_error(actor_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--ckpt", actor_ckpt, "--task", "OfflineCarCircle-v0", "--plot", str(tmp_path / "x.png")])
    assert stop.value.code == 2
    assert "only PointRobot-v0 has a plot" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--ckpt", str(tmp_path / "missing.ckpt")])
    assert "no such file" in capsys.readouterr().err
