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


def test_frames_of_a_bullet_episode_as_a_gif_and_a_grid(tmp_path, capsys, monkeypatch):
    from simulators import needs

    needs("bullet")
    from PIL import Image

    from lightning_saferl.envs import make_env

    task = "OfflineBallCircle-v0"  # 200-step episodes
    env = make_env(task)
    data = write_tiny(tmp_path / "ball.hdf5", obs_dim=env.observation_space.shape[0],
                      act_dim=env.action_space.shape[0])
    env.close()
    main(["fit", "--model", "lightning_saferl.actors.BCAll", "--model.hidden_dims", "[8]", "--data.task", task,
          "--data.path", data, "--data.batch_size", "16", "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(tmp_path), *QUIET])
    ckpt = str(next(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt")))
    capsys.readouterr()
    saved = []
    save = evaluate_module.save_frames
    monkeypatch.setattr(evaluate_module, "save_frames",
                        lambda frames, *a, **k: (saved.append(frames), save(frames, *a, **k)))
    runs = {}
    for name, extra in (("plain", []), ("gif", ["--frames", str(tmp_path / "ep.gif"), "--frame_every", "60"]),
                        ("png", ["--frames", str(tmp_path / "ep.png"), "--frame_every", "60"])):
        main(["evaluate", "--ckpt", ckpt, "--task", task, "--episodes", "2", "--num_envs", "2", *extra])
        runs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert runs["gif"].pop("frames") == str(tmp_path / "ep.gif")
    assert runs["png"].pop("frames") == str(tmp_path / "ep.png")
    assert runs["plain"] == runs["gif"] == runs["png"]  # rendering changes no episode
    steps, frames = zip(*saved[0])
    assert steps == (0, 60, 120, 180, 200)  # the reset, every 60 steps and the last step; one episode only
    with Image.open(tmp_path / "ep.gif") as gif:  # Pillow merges equal consecutive frames, adding their durations
        durations = []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
            assert np.array_equal(np.asarray(gif.convert("RGB")).shape, frames[0].shape)
    assert sum(durations) == 100 * len(frames)
    assert (tmp_path / "ep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frames_of_a_task_that_does_not_render_is_a_one_line_error(actor_ckpt, tmp_path, capsys):
    for extra, message in ((["--frames", str(tmp_path / "x.gif")], "PointRobot-v0 does not render; --plot"),
                           (["--task", "OfflineBallCircle-v0", "--frames", str(tmp_path / "x.mp4")],
                            "give a .gif or .png path, got"),
                           (["--task", "OfflineBallCircle-v0", "--frames", str(tmp_path / "x.gif"),
                             "--frame_every", "0"], "--frame_every: expected >= 1, got 0")):
        with pytest.raises(SystemExit) as stop:
            main(["evaluate", "--ckpt", actor_ckpt, *extra])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
