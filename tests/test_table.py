"""`lightning-saferl table` on finished runs written by hand: DSRL-normalised rows at several cost limits, a task
family of two tasks, a seed found twice, and the printed table.

Runs (algorithm fisor, every run scored at limits 10, 20, 40; reward = the summary's normalised return, cost =
cost_mean / L):
    OfflineCarCircle-v0  seeds 0, 1, 2: normalised return 0.5, 0.6, 0.7; cost_mean 5, 15, 25
    OfflineBallRun-v0    seeds 0, 1:    normalised return 0.2, 0.4;      cost_mean 10, 30
    OfflineBallRun-v0    seed 1 again, in a directory that sorts later: return 1.0, cost 100 (must be ignored)
Rows by hand (population std):
    CarCircle: reward 0.6 +- sqrt(0.02 / 3) = 0.0816; cost at 10: 1.5 +- 0.8165, at 20: 0.75 +- 0.408,
               at 40: 0.375 +- 0.204
    BallRun:   reward 0.3 +- 0.1; cost at 10: 2.0 +- 1.0, at 20: 1.0 +- 0.5 (exactly 1: safe), at 40: 0.5 +- 0.25
Family (Bullet-Safety-Gym, 2 tasks), the mean +- std of the two rows' means per limit: reward 0.45 +- 0.15; cost at
10: 1.75 +- 0.25, at 20: 0.875 +- 0.125, at 40: 0.4375 +- 0.0625; over all limits (6 rows): cost 1.0208 +- 0.5702.
"""
import json
import math

import pytest

from lightning_saferl.cli import main

LIMITS = [10.0, 20.0, 40.0]
RUNS = {"sweep/car/seed_0": ("OfflineCarCircle-v0", 0, 0.5, 5.0),
        "sweep/car/seed_1": ("OfflineCarCircle-v0", 1, 0.6, 15.0),
        "sweep/car/seed_2": ("OfflineCarCircle-v0", 2, 0.7, 25.0),
        "sweep/ball/seed_0": ("OfflineBallRun-v0", 0, 0.2, 10.0),
        "sweep/ball/seed_1": ("OfflineBallRun-v0", 1, 0.4, 30.0),
        "z_copy/ball/seed_1": ("OfflineBallRun-v0", 1, 1.0, 100.0)}


@pytest.fixture
def runs(tmp_path):
    for name, (task, seed, normalized_return, cost_mean) in RUNS.items():
        run = tmp_path / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("algorithm: fisor\n")
        (run / "summary.json").write_text(json.dumps({
            "task": task, "algorithm": "fisor", "seed": seed, "cost_limit": LIMITS[0], "cost_limits": LIMITS,
            "return_mean": 123.0, "normalized_return": normalized_return, "cost_mean": cost_mean}))
    return tmp_path


def test_table_rows_per_task_and_limit_and_per_family(runs, tmp_path, capsys):
    table = json.loads(_table(runs, tmp_path / "out", capsys)[1])
    rows = {(r["task"], r["cost_limit"]): r for r in table["rows"]}
    assert list(rows) == [("OfflineBallRun-v0", limit) for limit in LIMITS] + \
        [("OfflineCarCircle-v0", limit) for limit in LIMITS]
    car_reward, car_costs = (0.6, math.sqrt(0.02 / 3)), {10: (1.5, 0.8165), 20: (0.75, 0.4082), 40: (0.375, 0.2041)}
    ball_reward, ball_costs = (0.3, 0.1), {10: (2.0, 1.0), 20: (1.0, 0.5), 40: (0.5, 0.25)}
    for task, reward, costs, n in (("OfflineCarCircle-v0", car_reward, car_costs, 3),
                                   ("OfflineBallRun-v0", ball_reward, ball_costs, 2)):
        for limit, cost in costs.items():
            row = rows[(task, limit)]
            assert (row["n"], row["reward_kind"], row["family"]) == (n, "normalized", "Bullet-Safety-Gym")
            assert (row["reward_mean"], row["reward_std"]) == pytest.approx(reward, abs=1e-4)
            assert (row["cost_mean"], row["cost_std"]) == pytest.approx(cost, abs=1e-4)
            assert row["safe"] == (cost[0] <= 1.0)
    assert rows[("OfflineBallRun-v0", 20.0)]["safe"]  # normalised cost exactly 1 is safe

    families = {f["cost_limit"]: f for f in table["families"]}
    assert list(families) == [*LIMITS, "all"]
    expected = {10: (1.75, 0.25), 20: (0.875, 0.125), 40: (0.4375, 0.0625), "all": (1.0208, 0.5702)}
    for limit, cost in expected.items():
        family = families[limit]
        assert (family["task"], family["n"]) == ("Bullet-Safety-Gym (2 tasks)", 6 if limit == "all" else 2)
        assert (family["reward_mean"], family["reward_std"]) == pytest.approx((0.45, 0.15), abs=1e-4)
        assert (family["cost_mean"], family["cost_std"]) == pytest.approx(cost, abs=1e-4)
    assert [families[limit]["safe"] for limit in expected] == [False, True, True, False]
    assert table["runs"] == sorted(str(runs / name) for name in RUNS)  # the copy is found, then counted once


def test_table_command_prints_the_markdown_table(runs, tmp_path, capsys):
    printed, _ = _table(runs, tmp_path / "out", capsys)
    lines = printed.splitlines()
    assert lines[0].startswith("Results of 6 finished runs. reward: DSRL normalised return")
    assert "| task | algorithm | cost limit | reward | cost | n | safe |" in lines
    for line in ("| OfflineBallRun-v0 | fisor | 20 | 0.300 ± 0.100 | 1.000 ± 0.500 | 2 | yes |",
                 "| OfflineCarCircle-v0 | fisor | 10 | 0.600 ± 0.082 | 1.500 ± 0.816 | 3 | **no** |",
                 "| Bullet-Safety-Gym (2 tasks) | fisor | 40 | 0.450 ± 0.150 | 0.438 ± 0.062 | 2 | yes |",
                 "| Bullet-Safety-Gym (2 tasks) | fisor | all | 0.450 ± 0.150 | 1.021 ± 0.570 | 6 | **no** |"):
        assert line in lines, line
    assert "(raw)" not in printed  # DSRL tasks: normalised rewards


def _table(runs, out, capsys):
    """(what `lightning-saferl table RUNS --out OUT` printed, the table.json it wrote)."""
    capsys.readouterr()
    main(["table", str(runs), "--out", str(out)])
    return capsys.readouterr().out, (out / "table.json").read_text()
