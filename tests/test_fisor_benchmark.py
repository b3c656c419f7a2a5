"""benchmarks/fisor_point_robot.py's plumbing: its recipe steps (the published method, each departure in turn, the
variant) and one seed's figures at smoke size on a tiny file."""
import argparse
import json
import math

import pytest
import torch

from lightning_saferl.envs import point_robot as pr
from lightning_saferl.envs.oracle import escape_margin
from lightning_saferl.pipeline import make_plan, parse_args
from scripts import load_script
from tiny_data import write_tiny


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/fisor_point_robot.py")


def _args(bench, tmp_path, **kwargs):
    values = dict(recipe=str(bench.RECIPE), reference_recipe=str(bench.REFERENCE_RECIPE), set=[], ablation=False,
                  quick=True, standard_episodes=2, bc_steps=5, random_episodes=3, start_seed=0,
                  run_dir=str(tmp_path / "bench"), bank=None)
    return argparse.Namespace(**{**values, **kwargs})


def test_the_ablation_goes_from_the_published_recipe_to_the_variant(bench, tmp_path):
    steps = bench.recipe_steps(_args(bench, tmp_path, ablation=True))
    assert steps[0] == ("published", str(bench.REFERENCE_RECIPE), [])
    assert steps[-1] == ("fisor_guard", str(bench.RECIPE), [])
    assert [name for name, _, _ in steps[1:-1]] == [f"+{name}" for name, _ in bench.ABLATION]
    assert all(set(a[2]) < set(b[2]) for a, b in zip(steps[1:-2], steps[2:-1]))  # cumulative
    # the last departure step is the variant without its cost critic: the same critics (config records, so a run
    # reuses them) and the same actor but for the tie-break and its input
    tiny = write_tiny(tmp_path / "tiny.hdf5")
    last, variant = (make_plan(parse_args(["--config", recipe, *(f"--{s}" for s in settings), "--data.path", tiny]))
                     for _, recipe, settings in steps[-2:])
    assert set(variant.names) - set(last.names) == {"cost_critic"}
    assert all(last.records[name] == variant.records[name] for name in ("feasibility_critic", "reward_critic"))
    ours, theirs = last.parsed["actor"], variant.parsed["actor"]
    theirs_args, ours_args = theirs.model.init_args.as_dict(), ours.model.init_args.as_dict()
    assert {k for k in theirs_args if theirs_args[k] != ours_args[k]} == {"cost_tiebreak"}
    assert ours_args["cost_tiebreak"] == 0 and set(ours_args) == set(theirs_args)
    assert theirs.trainer == ours.trainer and theirs.data == ours.data
    assert bench.recipe_steps(_args(bench, tmp_path))[1:] == [("fisor_guard", str(bench.RECIPE), [])]


@pytest.mark.slow  # two smoke pipelines and eight short evaluations: minutes on 2 shared cores
def test_one_seed_reports_the_variant_the_published_recipe_and_the_baselines(bench, tmp_path, monkeypatch):
    tiny = write_tiny(tmp_path / "tiny.hdf5")
    monkeypatch.setattr(bench, "parse_args", lambda argv: parse_args([*argv, "--data.path", tiny]))

    def untrained_bc(cls, steps, seed_dir, seed, behavior):
        model, path = cls(pr.OBS_DIM, pr.ACT_DIM), seed_dir / f"{cls.__name__}.pt"
        torch.save(model.state_dict(), path)
        return model, path
    monkeypatch.setattr(bench, "train_bc", untrained_bc)
    starts = torch.tensor([[-1.8, 0.0, 1.0, math.pi / 4], [1.5, -1.2, 1.5, math.pi / 2]], dtype=torch.float64)
    observations = pr.observe(starts).float()
    data = {"starts": [{"state": s.tolist()} for s in starts], "escape_margin": escape_margin(starts).numpy(),
            "tight_starts": starts[:0], "observations": observations,
            "oracle": torch.ones(2, dtype=torch.bool), "hazard": torch.zeros(2, dtype=torch.bool)}
    figures = bench.run_seed(0, "mixed", data, _args(bench, tmp_path), tmp_path / "bench")
    assert list(figures["steps"]) == ["published", "fisor_guard"]
    assert set(bench.SUMMARY_KEYS) <= set(figures)
    assert figures["random_start_cost"] == figures["steps"]["fisor_guard"]["random_start_cost"]
    assert figures["reference_random_start_cost"] == figures["steps"]["published"]["random_start_cost"]
    for step in figures["steps"].values():
        assert set(bench.STEP_KEYS) <= set(step) and step["standard_start_episodes"] == 2
        assert step["random_start_normalized_cost@0"] == pytest.approx(step["random_start_cost"] + 1)
        assert step["random_start_normalized_cost@5"] == pytest.approx(step["random_start_cost"] / 5)
    # the variant's run started from the published one's: its reward critic (same config) was not retrained
    published, variant = (tmp_path / "bench" / "mixed" / "seed0" / name / "reward_critic" / "model.ckpt"
                          for name in ("published", "fisor_guard"))
    assert torch.load(published, weights_only=True)["state_dict"].keys() == \
        torch.load(variant, weights_only=True)["state_dict"].keys()
    assert published.read_bytes() == variant.read_bytes()
    summary = bench.summarize_dataset("mixed", {**data, "trivial_grid": {"shadow_recall": 0, "iou": 0,
                                                                         "false_infeasible_rate": 0},
                                                "trivial_data": {"shadow_recall": 0}, "stats": {},
                                                "one_step_rule_greedy": 0.0}, {0: figures}, [0])
    assert {"random_start_cost_mean", "bc_safe_random_start_cost_mean", "bc_all_random_start_cost_mean",
            "reference_feasible_start_violation_rate_mean", "reference_goal_rate_mean",
            "reference_random_start_cost_mean", "feasible_start_violation_rate_mean"} <= set(summary)
    assert set(summary["ablation"]) == {"published", "fisor_guard"}


def test_figures_are_reused_while_checkpoint_code_and_starts_are_the_same(bench, tmp_path):
    checkpoint, calls = tmp_path / "model.ckpt", []
    checkpoint.write_bytes(b"weights")
    data, args = {"starts": [{"state": [0.0, 1.0, 0.0, 0.0]}]}, _args(bench, tmp_path)

    def compute():
        calls.append(1)
        return {"goal_rate": 0.5 + len(calls)}
    assert bench.cached_figures(checkpoint, data, args, compute) == {"goal_rate": 1.5}
    assert bench.cached_figures(checkpoint, data, args, compute) == {"goal_rate": 1.5} and len(calls) == 1
    checkpoint.write_bytes(b"retrained")
    assert bench.cached_figures(checkpoint, data, args, compute) == {"goal_rate": 2.5}
    args.random_episodes += 1
    assert bench.cached_figures(checkpoint, data, args, compute) == {"goal_rate": 3.5}
    data["starts"][0]["state"][0] = 0.5
    assert bench.cached_figures(checkpoint, data, args, compute) == {"goal_rate": 4.5} and len(calls) == 4


def test_the_ablation_table_holds_every_step_and_both_baselines_per_seed(bench, tmp_path):
    args = _args(bench, tmp_path, ablation=True, feasible_episodes=2000)
    run_dir, steps = tmp_path / "bench", bench.recipe_steps(args)
    for seed in (0, 1):
        seed_dir = run_dir / "mixed" / f"seed{seed}"
        places = [seed_dir / name.lstrip("+") / "actor" / "model.ckpt" for name, _, _ in steps]
        places += [seed_dir / f"{cls}_steps{args.bc_steps}.ckpt" for cls in ("bcall", "bcsafe")]
        for rank, place in enumerate(places):
            place.parent.mkdir(parents=True, exist_ok=True)
            place.write_bytes(f"weights {seed} {rank}".encode())
            figures = {key: seed + rank / 10 for _, key, _, _ in bench.TABLE_COLUMNS}
            key = {"checkpoint_sha256": bench._sha256([place])}
            place.with_name(place.name + ".figures.json").write_text(json.dumps({"key": key, "figures": figures}))
    table = bench.ablation_table(run_dir, "mixed", [0, 1], args)
    assert [row[0] for row in table["rows"]] == [name for name, _, _ in steps] + \
        ["BC-All (5 steps)", "BC-Safe (5 steps)"]
    assert len(table["columns"]) == len(bench.TABLE_COLUMNS) + 1
    violating = table["rows"][1][1]  # the first departure, violating %: seeds 0.1 and 1.1 (x 100)
    assert violating["seeds"] == [10.0, 110.0] and violating["mean"] == 60.0 and violating["unit"] == "%"
    assert violating["std"] == pytest.approx(70.7107, abs=1e-3)
    with pytest.raises(FileNotFoundError, match="seed 2"):
        bench.ablation_table(run_dir, "mixed", [0, 1, 2], args)
    retrained = run_dir / "mixed" / "seed1" / "published" / "actor" / "model.ckpt"
    retrained.write_bytes(b"retrained, not evaluated yet")  # figures of another checkpoint are not this one's
    with pytest.raises(FileNotFoundError, match="'published', seed 1"):
        bench.ablation_table(run_dir, "mixed", [0, 1], args)


def test_banked_figures_resume_a_run_and_build_the_table_without_checkpoints(bench, tmp_path, monkeypatch):
    args = _args(bench, tmp_path, ablation=True, feasible_episodes=2000, bank=str(tmp_path / "bank"))
    data = {"starts": [{"state": [0.0, 1.0, 0.0, 0.0]}]}
    starts = bench._starts_sha256(data)
    key = bench._bank_key(starts, args, ["a=1"], (bench.RECIPE,))
    bench.bank(args, "mixed", 0, "+proposals", key, {"goal_rate": 0.7})
    assert bench.banked(args, "mixed", 0, "+proposals", key) == {"goal_rate": 0.7}
    stored = json.loads((tmp_path / "bank" / "mixed" / "seed0" / "proposals.json").read_text())
    assert stored["date"] and stored["machine"] and stored["commit"]
    # other settings, starts or episode counts: not the banked figures
    assert bench.banked(args, "mixed", 0, "+proposals", bench._bank_key(starts, args, ["a=2"], (bench.RECIPE,))) is None
    args.random_episodes += 1
    assert bench.banked(args, "mixed", 0, "+proposals", bench._bank_key(starts, args, ["a=1"], (bench.RECIPE,))) is None
    args.random_episodes -= 1
    # an edited recipe file: not the banked figures
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(bench.RECIPE.read_text())
    assert bench._bank_key(starts, args, ["a=1"], (recipe,)) == key
    recipe.write_text(bench.RECIPE.read_text() + "# edited\n")
    assert bench.banked(args, "mixed", 0, "+proposals", bench._bank_key(starts, args, ["a=1"], (recipe,))) is None
    # a banked seed returns without training anything
    monkeypatch.setattr(bench, "train_step", lambda *a: pytest.fail("a banked seed trained"))
    seed_key = bench._seed_bank_key(starts, args)
    bench.bank(args, "mixed", 1, "seed", seed_key, {"steps": {}, "goal_rate": 0.8})
    assert bench.run_seed(1, "mixed", data, args, tmp_path / "bench")["goal_rate"] == 0.8
    # the table from the bank alone
    keys = {name.lstrip("+"): bench._bank_key(starts, args, settings, (recipe,))
            for name, recipe, settings in bench.recipe_steps(args)}
    keys.update(bc_all=bench._bank_key(starts, args, []), bc_safe=bench._bank_key(starts, args, []))
    for seed in (0, 1):
        for rank, (name, step_key) in enumerate(keys.items()):
            bench.bank(args, "mixed", seed, name, step_key, {k: seed + rank / 10 for _, k, _, _ in bench.TABLE_COLUMNS})
    table = bench.ablation_table(tmp_path / "no_runs", "mixed", [0, 1], args)
    assert [row[0] for row in table["rows"]][-2:] == ["BC-All (5 steps)", "BC-Safe (5 steps)"]
    assert table["rows"][1][1]["seeds"] == [10.0, 110.0]
    with pytest.raises(FileNotFoundError, match="seed 2"):
        bench.ablation_table(tmp_path / "no_runs", "mixed", [0, 1, 2], args)
    # figures banked for other settings or other starts are not put in the table
    bench.bank(args, "mixed", 1, "proposals", key, {k: 0.0 for _, k, _, _ in bench.TABLE_COLUMNS})
    with pytest.raises(ValueError, match=r"seed1/proposals.json: banked for other \['recipes_sha256', 'settings'\]"):
        bench.ablation_table(tmp_path / "no_runs", "mixed", [0, 1], args)
    bench.bank(args, "mixed", 1, "proposals", {**keys["proposals"], "starts_sha256": "other starts"},
               {k: 0.0 for _, k, _, _ in bench.TABLE_COLUMNS})
    with pytest.raises(ValueError, match="held-out starts"):
        bench.ablation_table(tmp_path / "no_runs", "mixed", [0, 1], args)
