"""benchmarks/osrl_parity.py's pure parts: the mapping of our recipes' settings onto OSRL's arguments and the
aggregation of per-seed scores. Training OSRL needs its own venv (benchmarks/osrl_env.sh) and is not run here."""
import pytest

from scripts import load_script


@pytest.fixture(scope="module")
def parity():
    return load_script("benchmarks/osrl_parity.py")


@pytest.mark.parametrize("method", ["bcq_lag", "cpq", "coptidice"])
def test_osrl_gets_the_recipes_widths_rates_batch_steps_and_scales(parity, method):
    ours = parity.recipe_settings(method, parity.class_defaults(method))
    settings, _ = parity.osrl_settings(method, ours, seed=3, steps=123, cost_limit=20.0, episode_len=200)
    model, trainer = settings["model"], settings["trainer"]
    assert model["a_hidden_sizes"] == list(ours["hidden_dims"])
    assert model["c_hidden_sizes"] == list(ours["critic_hidden_dims"])
    assert model["gamma"] == ours["discount"]
    assert trainer["critic_lr"] == ours["lr"]
    assert trainer["actor_lr"] == ours.get("actor_lr", ours["lr"])
    assert (settings["seed"], settings["steps"], settings["cost_limit"], settings["episode_len"]) == (3, 123, 20.0, 200)
    assert settings["batch_size"] == ours["batch_size"] == 512
    assert settings["reward_scale"] == ours["reward_scale"] == 0.1
    if method != "coptidice":
        assert model["vae_hidden_sizes"] == ours["vae_hidden_dim"]
        assert model["sample_action_num"] == ours["num_samples"]
        assert model["beta"] == ours["vae_beta"]


def test_settings_osrl_cannot_take_are_listed_and_unknown_ones_refused(parity):
    ours = parity.recipe_settings("cpq", parity.class_defaults("cpq"))
    _, unmatched = parity.osrl_settings("cpq", ours, seed=0, steps=1, cost_limit=20.0, episode_len=200)
    assert unmatched == ["alpha_max=1.0 (OSRL: none)"]  # ood_quantile 0.75 equals OSRL's fixed value
    _, unmatched = parity.osrl_settings("cpq", {**ours, "ood_quantile": 0.5}, seed=0, steps=1, cost_limit=20.0,
                                        episode_len=200)
    assert "ood_quantile=0.5 (OSRL: 0.75, fixed)" in unmatched
    with pytest.raises(KeyError, match="new_knob"):
        parity.osrl_settings("cpq", {**ours, "new_knob": 1}, seed=0, steps=1, cost_limit=20.0, episode_len=200)


def test_aggregate_gives_mean_and_population_std_per_side(parity):
    scores = {"cpq": {"ours": [(0.2, 0.5), (0.4, 1.5)], "osrl": [(0.1, 2.0), (0.1, 4.0)]}}
    row = parity.aggregate(scores, [0, 1])["cpq"]
    assert row["ours_reward"] == pytest.approx(0.3) and row["ours_reward_std"] == pytest.approx(0.1)
    assert row["ours_cost"] == pytest.approx(1.0) and row["ours_cost_std"] == pytest.approx(0.5)
    assert row["osrl_cost"] == pytest.approx(3.0) and row["osrl_cost_std"] == pytest.approx(1.0)
    assert row["osrl_reward_std"] == 0.0 and row["seeds"] == [0, 1]
    with pytest.raises(ValueError, match="cpq ours has 2 scores for 3 seeds"):
        parity.aggregate(scores, [0, 1, 2])


def test_the_table_budget_is_the_one_the_bullet_table_cells_train_with(parity, tmp_path):
    table = load_script("benchmarks/bullet_table.py")
    for method in ("bcq_lag", "cpq", "coptidice"):
        budget = parity.table_budget(method)
        argv = " ".join(table.cells([method], "d/{task}.hdf5", tmp_path, ["OfflineBallCircle-v0"], [0], [20])[0].argv)
        assert f"--stages.policy.trainer.max_steps {budget['steps']}" in argv
        if "batch_size" in budget:
            assert f"--stages.policy.data.batch_size {budget['batch_size']}" in argv
    assert "batch_size" not in parity.table_budget("coptidice")  # the recipe's batch
