from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import lightning_saferl.data.collect as collect_module
from lightning_saferl.data.datamodule import OfflineDataModule, point_robot_dataset_path
from lightning_saferl.data.format import DatasetError, write_dataset
from lightning_saferl.data.tasks import get_task
from lightning_saferl.errors import InputError


def point_arrays(n=10, obs_dim=11, act_dim=2):
    rng = np.random.default_rng(1)
    timeouts = np.zeros(n)
    timeouts[n // 2 - 1] = 1
    return {
        "observations": rng.normal(size=(n, obs_dim)), "next_observations": rng.normal(size=(n, obs_dim)),
        "actions": rng.uniform(-1, 1, size=(n, act_dim)), "rewards": np.arange(n, dtype=float),
        "costs": (np.arange(n) % 3 == 0).astype(float), "terminals": np.zeros(n), "timeouts": timeouts,
        "constraint_values": rng.normal(size=n),
    }


@pytest.fixture
def small_file(tmp_path):
    return str(write_dataset(tmp_path / "small.hdf5", point_arrays()))


def fake_trainer(rank=0, device="cpu"):
    return SimpleNamespace(global_rank=rank, strategy=SimpleNamespace(root_device=torch.device(device)))


def draw(dm, steps):
    return torch.stack([b["index"] for b in list(dm.train_dataloader())[:steps]])


def test_dims_known_at_construction_without_reading(tmp_path):
    dm = OfflineDataModule(cache_dir=str(tmp_path))
    assert (dm.obs_dim, dm.act_dim, dm.max_episode_steps, dm.cost_limit) == (11, 2, 300, 0.0)
    assert dm.task_spec is get_task("PointRobot-v0")
    assert not list(tmp_path.iterdir())  # nothing generated yet


def test_uniform_sampling_chi_square(small_file):
    dm = OfflineDataModule(path=small_file, batch_size=1000, steps_per_epoch=100, seed=3)
    idx = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert idx.numel() == 100_000 and idx.min() >= 0 and idx.max() <= 9
    counts = torch.bincount(idx, minlength=10).double()
    chi2 = (((counts - 10_000) ** 2) / 10_000).sum().item()
    assert chi2 < 33.7  # df = 9: P(chi2 > 33.7) ~ 1e-4


def test_streams_per_seed_and_rank(small_file):
    def stream(seed, rank):
        dm = OfflineDataModule(path=small_file, batch_size=64, steps_per_epoch=5, seed=seed)
        dm.trainer = fake_trainer(rank)
        return draw(dm, 5)

    a = stream(0, 0)
    assert torch.equal(a, stream(0, 0))
    assert not torch.equal(a, stream(0, 1))
    assert not torch.equal(a, stream(1, 0))
    assert not torch.equal(stream(1, 0), stream(0, 1))  # seed 0's second rank is not seed 1's first
    assert not torch.equal(a[0], a[1])  # successive batches differ


def test_no_two_seeds_and_ranks_share_a_stream():
    """Every (seed, rank) with seed < 1000 and rank < 64 has its own batch stream and its own stream of the module's
    noise (`step_seed`), judged on the 32 low bits that torch's CPU generator keeps of a seed (its first two
    steps' generator seeds; one step's seed may coincide by chance); a single process keeps the seed's own batch
    stream (rank 0's key is the seed)."""
    from lightning_saferl.seeding import rank_stream_key, step_seed, stream_seed

    a = torch.Generator().manual_seed(5)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=torch.Generator().manual_seed(5 + 2 ** 32)))
    low = 0xFFFFFFFF
    pairs = [(seed, rank) for seed in range(1000) for rank in range(64)]
    keys = {rank_stream_key(seed, rank) for seed, rank in pairs}
    assert len(keys) == len(pairs)
    assert len({(stream_seed(key, 0) & low, stream_seed(key, 1) & low) for key in keys}) == len(pairs)
    assert len({(step_seed(seed, rank, 0) & low, step_seed(seed, rank, 1) & low) for seed, rank in pairs}) == len(pairs)
    assert [rank_stream_key(seed, 0) for seed in (0, 7, 2 ** 32 - 1)] == [0, 7, 2 ** 32 - 1]
    with pytest.raises(ValueError, match=r"data.seed must be in \[0, 2\^32\).*got -1"):
        OfflineDataModule(seed=-1)


def test_epoch_length_and_batch_contents(small_file):
    dm = OfflineDataModule(path=small_file, batch_size=32, steps_per_epoch=7)
    loader = dm.train_dataloader()
    assert len(loader) == 7
    batches = list(loader)
    assert len(batches) == 7 and len(list(loader)) == 7 and dm.batches_drawn == 14
    b = batches[0]
    assert set(b) == {"observations", "actions", "rewards", "costs", "next_observations", "masks", "terminals",
                      "constraint_values", "failures", "index"}  # failures: PointRobot's out-of-bounds ends
    assert b["observations"].shape == (32, 11) and b["next_observations"].shape == (32, 11)
    assert b["actions"].shape == (32, 2)
    for k in ("rewards", "costs", "masks", "terminals", "constraint_values", "failures", "index"):
        assert b[k].shape == (32,)
    assert all(v.device.type == "cpu" for v in b.values())
    assert b["index"].dtype == torch.long and b["observations"].dtype == torch.float32
    data = dm.transitions
    assert torch.equal(b["rewards"], data.rewards[b["index"]])
    expected_masks = torch.tensor([0.0 if i == 4 else 1.0 for i in range(10)])
    assert torch.equal(b["masks"], expected_masks[b["index"]])


def test_no_constraint_values_key_when_absent(tmp_path):
    arrays = point_arrays()
    del arrays["constraint_values"]
    dm = OfflineDataModule(path=str(write_dataset(tmp_path / "d.hdf5", arrays)), batch_size=4, steps_per_epoch=1)
    assert "constraint_values" not in next(iter(dm.train_dataloader()))


def test_state_dict_restores_stream(small_file):
    dm = OfflineDataModule(path=small_file, batch_size=16, steps_per_epoch=5, seed=7)
    it = iter(dm.train_dataloader())
    for _ in range(3):
        next(it)
    state = dm.state_dict()
    expected = [next(it)["index"] for _ in range(2)]

    resumed = OfflineDataModule(path=small_file, batch_size=16, steps_per_epoch=5, seed=7)
    resumed.load_state_dict(state)
    got = [b["index"] for b in list(resumed.train_dataloader())[:2]]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    fresh = OfflineDataModule(path=small_file, batch_size=16, steps_per_epoch=5, seed=7)
    assert not torch.equal(next(iter(fresh.train_dataloader()))["index"], expected[0])


def test_full_batch(small_file):
    dm = OfflineDataModule(path=small_file)
    full = dm.full_batch()
    assert full["observations"].shape == (10, 11) and torch.equal(full["index"], torch.arange(10))
    assert full["observations"] is dm.transitions.observations  # no copy on the same device
    assert full["masks"].sum().item() == 9


class _Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].clone())
        return (self.w * batch["rewards"].mean() - 1.0) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, max_steps, **kw):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kw)


def test_lightning_fit_and_resume(small_file, tmp_path):
    full_dm = OfflineDataModule(path=small_file, batch_size=8, steps_per_epoch=3, seed=5)
    full = _Recorder()
    trainer = _trainer(tmp_path, 8)
    trainer.fit(full, datamodule=full_dm)
    assert trainer.global_step == 8 and trainer.num_training_batches == 3 and len(full.seen) == 8

    first_dm = OfflineDataModule(path=small_file, batch_size=8, steps_per_epoch=3, seed=5)
    first = _Recorder()
    trainer = _trainer(tmp_path, 6)
    trainer.fit(first, datamodule=first_dm)
    ckpt = tmp_path / "six.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed_dm = OfflineDataModule(path=small_file, batch_size=8, steps_per_epoch=3, seed=5)
    resumed = _Recorder()
    _trainer(tmp_path, 8).fit(resumed, datamodule=resumed_dm, ckpt_path=ckpt)
    assert resumed_dm.batches_drawn == 8 and len(resumed.seen) == 2
    assert all(torch.equal(a, b) for a, b in zip(full.seen, first.seen + resumed.seen))


def test_point_robot_generated_once_and_reused(tmp_path, monkeypatch):
    calls = []
    real_collect = collect_module.collect

    def counting_collect(*args, **kwargs):
        calls.append((args, kwargs))
        return real_collect(*args, progress=False, num_envs=4, **kwargs)

    monkeypatch.setattr(collect_module, "collect", counting_collect)
    dm = OfflineDataModule(cache_dir=str(tmp_path), num_transitions=400, seed=9, batch_size=4, steps_per_epoch=2)
    dm.setup("fit")
    target = point_robot_dataset_path(tmp_path, 400)
    assert target.exists() and target.name == "PointRobot-v0_mixed_n400_seed0.hdf5"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temp file left
    assert len(dm.transitions) == 400 and dm.transitions.constraint_values is not None
    assert calls[0][0][0] == "PointRobot-v0" and calls[0][1]["seed"] == 0  # data seed 0, not the sampling seed

    again = OfflineDataModule(cache_dir=str(tmp_path), num_transitions=400, seed=1)
    assert torch.equal(again.transitions.observations, dm.transitions.observations)
    assert len(calls) == 1


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SAFERL_CACHE", str(tmp_path / "c"))
    assert OfflineDataModule().cache_dir == tmp_path / "c"


def test_dsrl_dims_from_file_and_reward_scaling(tmp_path, monkeypatch):
    monkeypatch.setenv("DSRL_DATASET_DIR", str(tmp_path))
    spec = get_task("OfflineCarCircle-v0")
    absent = OfflineDataModule(task=spec.task_id, download=False)
    assert absent.obs_dim is None and absent.act_dim is None and absent.max_episode_steps == 300
    with pytest.raises(DatasetError, match="download=False"):
        absent.setup()

    write_dataset(tmp_path / spec.dataset_file, point_arrays(obs_dim=5, act_dim=3))
    dm = OfflineDataModule(task=spec.task_id, download=False, scale_reward=True)
    assert (dm.obs_dim, dm.act_dim, dm.cost_limit) == (5, 3, 10.0)
    factor = 300 / (534.3060913085938 - 3.484419822692871)
    assert dm.transitions.rewards[1].item() == pytest.approx(factor)

    with pytest.raises(ValueError, match="no DSRL reference scores"):
        OfflineDataModule(scale_reward=True)


def test_wrong_shapes_for_point_robot(tmp_path):
    bad = str(write_dataset(tmp_path / "bad.hdf5", point_arrays(obs_dim=4)))
    dm = OfflineDataModule(path=bad)
    with pytest.raises(DatasetError, match=r"expected \(N, 11\), found \(10, 4\)"):
        dm.setup()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_batches_on_gpu(small_file):
    dm = OfflineDataModule(path=small_file, batch_size=64, steps_per_epoch=3)
    dm.trainer = fake_trainer(0, "cuda:0")
    batches = list(dm.train_dataloader())
    assert all(v.device.type == "cuda" for b in batches for v in b.values())
    assert dm.transitions.observations.device.type == "cuda"
    cpu_dm = OfflineDataModule(path=small_file, batch_size=64, steps_per_epoch=3)
    assert len({tuple(b["index"].tolist()) for b in batches}) == 3
    assert cpu_dm.full_batch("cuda:0")["observations"].device.type == "cuda"


def test_task_placeholder_in_path_reads_each_tasks_file(tmp_path):
    for task, obs_dim in (("OfflineCarCircle-v0", 5), ("OfflineBallCircle-v0", 4)):
        (tmp_path / task).mkdir()
        write_dataset(tmp_path / task / f"{task}.hdf5", point_arrays(obs_dim=obs_dim, act_dim=3))
    template = str(tmp_path / "{task}" / "{task}.hdf5")
    car = OfflineDataModule(task="OfflineCarCircle-v0", path=template, download=False)
    ball = OfflineDataModule(task="OfflineBallCircle-v0", path=template, download=False)
    assert (car.obs_dim, ball.obs_dim) == (5, 4)
    assert car.path == str(tmp_path / "OfflineCarCircle-v0" / "OfflineCarCircle-v0.hdf5")

    with pytest.raises(InputError, match=r"only \{task\}.*'seed'"):
        OfflineDataModule(task="OfflineCarCircle-v0", path=str(tmp_path / "{seed}.hdf5"))
