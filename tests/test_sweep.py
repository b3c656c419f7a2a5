"""`lightning-saferl sweep` and `table`: cells on a local Ray, rerun/refusal/failure handling, the table's numbers,
and the cost-limit protocol (limit-following recipe fields, per-limit scores).

The sweeps run a tiny BC-Safe recipe (8-unit MLP, 4 steps, 2 evaluation episodes) on a 200-transition PointRobot
file, on one Ray instance (2 CPUs) shared by the module.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_saferl.data.tasks import get_task
from lightning_saferl.evaluation import limit_scores
from lightning_saferl.sweep import plan, resolved_config, run_cells, run_sweep, sweep_main
from lightning_saferl.table import table_main

ray = pytest.importorskip("ray")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}


def bc_safe_recipe(data_path, hidden=8):
    return {"algorithm": "bc_safe", "cost_limit": 0.0,
            "cost_limit_fields": ["stages.policy.model.init_args.cost_limit"],
            "data": {"task": "PointRobot-v0", "path": data_path, "batch_size": 16, "steps_per_epoch": 3},
            "trainer": {"max_steps": 4, "log_every_n_steps": 1, **QUIET},
            "stages": {"policy": {"model": {"class_path": "lightning_saferl.actors.BCSafe",
                                            "init_args": {"hidden_dims": [hidden], "cost_limit": 0.0}}}},
            "evaluation": {"episodes": 2, "num_envs": 2}}


def write_yaml(path, obj):
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 1024 ** 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny, local_ray):
    root = tmp_path_factory.mktemp("sweep")
    recipe = write_yaml(root / "recipe.yaml", bc_safe_recipe(tiny))
    cells = run_sweep(recipe, str(root / "out"), seeds=[0, 1], cost_limits=[0, 10])
    return root, recipe, cells


def summaries(out):
    return {str(p.parent.relative_to(out)): json.loads(p.read_text()) for p in sorted(out.rglob("summary.json"))}


def test_sweep_runs_every_cell_and_tables_the_means(sweep):
    root, _, cells = sweep
    out = root / "out"
    assert [c.status for c in cells] == ["finished"] * 4
    runs = summaries(out)
    assert sorted(runs) == [f"bc_safe/PointRobot-v0/limit_{limit}/seed_{seed}" for limit in (0, 10) for seed in (0, 1)]
    for name, summary in runs.items():
        limit = float(name.split("limit_")[1].split("/")[0])
        # the recipe's limit-following field was set to the cell's limit, and the cell is scored at that limit
        [stage] = (out / name / "policy").glob("lightning_logs/version_*/config.yaml")
        assert yaml.safe_load(stage.read_text())["model"]["init_args"]["cost_limit"] == limit
        assert summary["cost_limits"] == [limit] and (out / name / "log.txt").stat().st_size > 0
    table = json.loads((out / "table.json").read_text())
    assert [(r["task"], r["cost_limit"], r["n"]) for r in table["rows"]] == [("PointRobot-v0", 0.0, 2),
                                                                             ("PointRobot-v0", 10.0, 2)]
    for row in table["rows"]:
        cell = [s for n, s in runs.items() if f"limit_{row['cost_limit']:g}/" in n]
        returns = [s["return_mean"] for s in cell]  # PointRobot: raw returns (no reference scores)
        e = 1.0 if row["cost_limit"] == 0 else 0.0
        costs = [(s["cost_mean"] + e) / (row["cost_limit"] + e) for s in cell]
        assert row["reward_kind"] == "raw"
        assert (row["reward_mean"], row["reward_std"]) == pytest.approx((np.mean(returns), np.std(returns)))
        assert (row["cost_mean"], row["cost_std"]) == pytest.approx((np.mean(costs), np.std(costs)))
        assert row["safe"] == (np.mean(costs) <= 1)
    family_all = [f for f in table["families"] if f["cost_limit"] == "all"]
    assert len(family_all) == 1 and family_all[0]["cost_mean"] == pytest.approx(
        np.mean([r["cost_mean"] for r in table["rows"]]))
    assert (out / "table.png").stat().st_size > 0 and "PointRobot-v0 | bc_safe | 10" in (out / "table.md").read_text()
    assert len((out / "table.csv").read_text().splitlines()) == 1 + len(table["rows"]) + len(table["families"])


def test_rerun_trains_nothing(sweep, capsys):
    root, recipe, _ = sweep
    out = root / "out"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.ckpt")} | {p: p.stat().st_mtime_ns
                                                                        for p in out.rglob("summary.json")}
    cells = run_sweep(recipe, str(out), seeds=[0, 1], cost_limits=[0, 10])
    assert [c.status for c in cells] == ["skipped"] * 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "4 finished earlier, 0 to run" in capsys.readouterr().out


def test_interrupted_cell_is_resumed(sweep):
    root, recipe, _ = sweep
    out = root / "out"
    cell = out / "bc_safe/PointRobot-v0/limit_10/seed_1"
    model = cell / "policy" / "model.ckpt"
    stamp = model.stat().st_mtime_ns
    (cell / "summary.json").unlink()  # killed during the evaluation
    cells = run_sweep(recipe, str(out), seeds=[0, 1], cost_limits=[0, 10])
    assert [c.status for c in cells] == ["skipped", "skipped", "skipped", "finished"]
    assert (cell / "summary.json").exists() and model.stat().st_mtime_ns == stamp  # loaded, not trained again
    assert "finished earlier, loading" in (cell / "log.txt").read_text()


def test_changed_recipe_is_refused_for_a_finished_cell(sweep, tiny, capsys):
    root, _, _ = sweep
    out = root / "out"
    cell = out / "bc_safe/PointRobot-v0/limit_0/seed_0"
    before = (cell / "summary.json").read_text()
    changed = write_yaml(root / "changed.yaml", bc_safe_recipe(tiny, hidden=16))
    with pytest.raises(SystemExit) as stop:
        sweep_main(["--config", changed, "--out", str(out), "--seeds", "0", "--cost_limits", "0"])
    assert stop.value.code == 1
    printed = capsys.readouterr().out
    assert f"refused bc_safe/PointRobot-v0/limit_0/seed_0: {cell} was run with another config" in printed
    assert "changed: stages.policy.model.init_args.hidden_dims)" in printed
    assert (cell / "summary.json").read_text() == before


def test_failing_cell_leaves_the_others_finished_and_names_its_log(sweep, tmp_path, tiny, capsys):
    recipe = write_yaml(tmp_path / "recipe.yaml", bc_safe_recipe(tiny))
    missing = str(tmp_path / "missing.hdf5")
    cells = run_sweep(recipe, str(tmp_path / "out"), seeds=[0], cost_limits=[10],
                      grid=[f"data.path=[{tiny}, {missing}]"])
    by_name = {c.name: c for c in cells}
    good, bad = (f"bc_safe/PointRobot-v0/path={name}/limit_10/seed_0" for name in ("tiny.hdf5", "missing.hdf5"))
    assert (by_name[good].status, by_name[bad].status) == ("finished", "failed")
    assert "missing.hdf5" in by_name[bad].message
    log = tmp_path / "out" / bad / "log.txt"
    assert "missing.hdf5" in log.read_text()
    assert f"FAILED {bad}" in capsys.readouterr().out and not (tmp_path / "out" / bad / "summary.json").exists()
    # `table` rebuilds one table from several directories: this sweep's finished cell and the first sweep
    table = table_main([str(tmp_path / "out"), str(sweep[0] / "out"), "--out", str(tmp_path / "joint")])
    assert sorted({(r["algorithm"], r["cost_limit"], r["n"]) for r in table["rows"]}) == [
        ("bc_safe", 0.0, 2), ("bc_safe", 10.0, 2), ("bc_safe[path=tiny.hdf5]", 10.0, 1)]


def test_each_cell_that_finishes_is_handed_over_as_it_finishes(tmp_path, tiny, local_ray):
    recipe = write_yaml(tmp_path / "recipe.yaml", bc_safe_recipe(tiny))
    cells = plan(recipe, tmp_path / "out", seeds=[0], cost_limits=[10],
                 grid=[f"data.path=[{tiny}, {tmp_path / 'missing.hdf5'}]"])
    handed = []
    run_cells(cells, tmp_path / "out", on_finished=lambda cell: handed.append(
        (cell.name, (tmp_path / "out" / cell.name / "summary.json").exists())))
    assert handed == [("bc_safe/PointRobot-v0/path=tiny.hdf5/limit_10/seed_0", True)]  # not the failed cell


def test_cost_limit_fields_follow_the_limit():
    recipe = str(CONFIGS / "drcorl" / "dsrl.yaml")
    init = resolved_config(["--config", recipe, "--cost_limit", "20"])["stages"]["policy"]["model"]["init_args"]
    assert (init["cost_limit"], init["cost_slack"]) == (20.0, 10.0)  # slack = 0.5 x limit
    with pytest.raises(ValueError, match="'stages.policy.model.init_args.no_such_field' is not a field"):
        resolved_config(["--config", recipe, "--cost_limit_fields", "[stages.policy.model.init_args.no_such_field]"])


def test_a_cell_hands_its_cost_limit_to_the_pipeline_as_a_number(tmp_path):
    """A limit-following recipe's cells carry their limit as a float, not as a command-line string; the pipeline
    applies it as it applies `--cost_limit`, wins over the command line's, and leaves the parsed config unchanged."""
    from lightning_saferl.pipeline import parse_args, resolve_cost_limit
    from lightning_saferl.sweep import plan

    cells = plan(str(CONFIGS / "drcorl" / "dsrl.yaml"), tmp_path, seeds=[0], cost_limits=[10, 20])
    assert [(type(c.cost_limit), c.cost_limit) for c in cells] == [(float, 10.0), (float, 20.0)]
    assert not any("--cost_limit" in c.argv for c in cells)
    given_as_text = resolved_config([*cells[1].argv, "--cost_limit", "20"])
    assert resolved_config(cells[1].argv, cells[1].cost_limit) == given_as_text
    cfg = parse_args([*cells[1].argv, "--cost_limit", "5"])
    stored = cfg.clone()
    init = resolve_cost_limit(cfg, 20.0).stages["policy"]["model"]["init_args"]
    assert (init["cost_limit"], init["cost_slack"]) == (20.0, 10.0)
    assert cfg == stored and cfg.stages["policy"]["model"]["init_args"]["cost_limit"] != 20.0


def test_limit_scores_follow_the_dsrl_formula_per_limit():
    spec = get_task("PointRobot-v0")
    assert spec.cost_limits == (0.0, 5.0, 10.0)
    assert limit_scores(3.0, spec, [0, 5, 10]) == {"normalized_cost@0": 4.0, "safe@0": False,
                                                   "normalized_cost@5": 0.6, "safe@5": True,
                                                   "normalized_cost@10": 0.3, "safe@10": True}
    assert get_task("OfflineCarCircle-v0").cost_limits == (10.0, 20.0, 40.0)
    assert get_task("OfflineCarGoal1Gymnasium-v0").cost_limits == (20.0, 40.0, 80.0)


def test_without_ray_the_sweep_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(SystemExit) as stop:
        sweep_main(["--config", str(CONFIGS / "baselines" / "bc_all_point_robot.yaml"), "--out", "unused"])
    assert stop.value.code == 2
    assert "pip install -e '.[sweep]'" in capsys.readouterr().err


def test_a_recipe_trained_once_is_scored_where_its_pipeline_would_score_it(tmp_path):
    """Without --cost_limits, a cell of a recipe that does not follow the limit is scored at the pipeline's own
    evaluation limits (`pipeline.evaluation_limits`: evaluation.cost_limits, else cost_limit, else the family's); a
    limit-following recipe gets one cell per limit of the family."""
    from lightning_saferl.sweep import plan

    def scored_at(recipe, *overrides):
        cells = plan(str(CONFIGS / recipe), tmp_path, seeds=[0], overrides=overrides)
        return [json.loads(cell.argv[cell.argv.index("--evaluation.cost_limits") + 1]) for cell in cells]

    assert scored_at("fisor/point_robot.yaml") == [[0.0, 5.0, 10.0]]  # PointRobot's family limits
    assert scored_at("fisor/point_robot.yaml", "--cost_limit", "3") == [[3.0]]
    given = ("--cost_limit", "3", "--evaluation.cost_limits", "[1, 2]")
    assert scored_at("fisor/point_robot.yaml", *given) == [[1.0, 2.0]]
    assert scored_at("baselines/bc_safe_point_robot.yaml") == [[0.0], [5.0], [10.0]]


def test_cells_at_other_limits_are_siblings_and_each_seeds_first_limit_comes_first(tmp_path):
    from lightning_saferl.sweep import plan

    cells = plan(str(CONFIGS / "drcorl" / "dsrl.yaml"), tmp_path, seeds=[0, 1], cost_limits=[10, 20])
    names = [c.name.split("/", 2)[2] for c in cells]
    assert names == ["limit_10/seed_0", "limit_10/seed_1", "limit_20/seed_0", "limit_20/seed_1"]
    assert cells[0].siblings == [str(tmp_path / cells[2].name)]
    assert cells[3].siblings == [str(tmp_path / cells[1].name)]
    once = plan(str(CONFIGS / "fisor" / "dsrl.yaml"), tmp_path, seeds=[0, 1], cost_limits=[10, 20])
    assert [c.siblings for c in once] == [[], []]
