"""benchmarks/bullet_table.py: the table's cells (which methods train per limit) and what --write commits."""
import json
from collections import Counter

import pytest

from lightning_saferl.data.download import file_sha256
from scripts import load_script

pytest.importorskip("ray")


def _bench():
    return load_script("benchmarks/bullet_table.py")


def test_every_method_gets_its_cells_budget_data_and_held_out_episodes(tmp_path):
    bench = _bench()
    cells = bench.cells(list(bench.BUDGETS), "data/{task}.hdf5", tmp_path, bench.TASKS, [0, 1, 2], [10, 20, 40])
    counts = Counter(c.name.split("/")[0] for c in cells)
    # FISOR and BC-All: one cell per task and seed, scored at every limit; the others one per limit
    assert counts == {"fisor": 6, "bc_all": 6, **{m: 18 for m in ("drcorl", "bc_safe", "bcq_lag", "cpq",
                                                                  "coptidice", "cdt")}}
    fisor = next(c for c in cells if c.name.startswith("fisor/OfflineCarCircle-v0/limits_10_20_40/seed_2"))
    argv = " ".join(fisor.argv)
    assert "--stages.actor.trainer.max_steps 5000" in argv and "--data.path data/{task}.hdf5" in argv
    assert "--evaluation.seed 100000" in argv and "--seed_everything 2" in argv
    # CDT's limit is an acting setting: its cells share one training per task and seed, DRCORL's policy follows it
    assert bench.limit_following_stages("cdt") == set() and bench.limit_following_stages("drcorl") == {"policy"}


def test_write_turns_the_table_into_rows_a_page_and_a_picture(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir(), results.mkdir()
    rows = [{"task": "OfflineCarCircle-v0", "algorithm": "bc_safe", "cost_limit": limit, "reward_mean": reward,
             "reward_std": 0.1, "cost_mean": cost, "cost_std": 0.2, "n": 3}
            for limit, reward, cost in ((10, 0.4, 0.5), (20, 0.6, 1.5))]
    (out / "table.json").write_text(json.dumps({"rows": rows}))
    (out / "table.md").write_text("| the sweep's table |\n")
    (out / "table.png").write_bytes(b"png")
    written = _bench().write_results(out, results, "python benchmarks/bullet_table.py --write")
    assert json.loads((results / "bullet.json").read_text()) == written
    assert written[1] == {"task": "OfflineCarCircle-v0", "algorithm": "bc_safe", "cost_limit": 20,
                          "reward_norm_mean": 0.6, "reward_norm_std": 0.1, "cost_norm_mean": 1.5,
                          "cost_norm_std": 0.2, "seeds": 3}
    page = (results / "bullet.md").read_text()
    assert "| OfflineCarCircle-v0 | bc_safe | 0.500 | 1.000 | **no** |" in page  # means over the limits
    assert "| the sweep's table |" in page and (results / "bullet.png").read_bytes() == b"png"


def test_bank_carries_finished_cells_to_a_fresh_out_only_for_the_same_dataset_file(tmp_path):
    bench = _bench()
    data = str(tmp_path / "{task}.hdf5")
    for task in bench.TASKS:
        (tmp_path / f"{task}.hdf5").write_bytes(b"dataset " + task.encode())
    out, bank = tmp_path / "out", tmp_path / "bank"
    planned = bench.cells(["bc_all"], data, out, bench.TASKS, [0], [10, 20, 40])
    finished = planned[0]
    (out / finished.name).mkdir(parents=True)
    (out / finished.name / "config.yaml").write_text("seed_everything: 0\n")
    (out / finished.name / "summary.json").write_text('{"return_mean": 1.5}')
    assert [bench.deposit_in_bank(bank, out, cell, data) for cell in planned] == [True] + [False] * (len(planned) - 1)
    assert not bench.deposit_in_bank(bank, out, finished, data)  # already banked
    record = json.loads((bank / finished.name / "dataset.json").read_text())
    assert record["sha256"] == file_sha256(bench.cell_dataset(finished, data))

    fresh = tmp_path / "fresh"
    assert bench.restore_from_bank(bank, fresh, planned, data) == 1
    assert (fresh / finished.name / "summary.json").read_text() == '{"return_mean": 1.5}'
    # another build of the dataset: the banked cell is not taken
    other = tmp_path / "other"
    bench.cell_dataset(finished, data).write_bytes(b"rebuilt differently")
    assert bench.restore_from_bank(bank, other, planned, data) == 0
    assert not (other / finished.name).exists()
