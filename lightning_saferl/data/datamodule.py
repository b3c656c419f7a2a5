"""OfflineDataModule: a fixed dataset on the training device, sampled uniformly with replacement.

Each training batch is ``batch_size`` row indices drawn uniformly from [0, N) with ``torch.randint`` on the
device holding the data, then gathered from tensors placed there once (no workers, no per-sample Python).
An epoch is exactly ``steps_per_epoch`` batches. A batch holds the transition columns, ``masks``, ``index`` and, where
the task has a rule for them (`failed_terminations`: PointRobot's out-of-bounds ends), ``failures``.

Sequence mode (``sequence_length=K``, for Decision-Transformer-like models): a drawn row e is the LAST step of a
window of the K rows e-K+1..e cut at e's episode start; a window of an episode's first k < K steps is left-padded
(DT's convention). Each key then has shape (B, K, ...): the transition columns, ``returns_to_go`` / ``costs_to_go``
(undiscounted sums of rewards / costs from the step to its episode's end), ``timesteps`` (step within the episode)
and ``padding_mask`` (True at real steps); padded steps hold zeros. All by index arithmetic on the device.

Random stream: batch ``k`` drawn by rank ``r`` uses a generator seeded with ``mix(seed + r 2^32, k)`` (``mix`` a
64-bit hash), so the stream is a pure function of (seed, rank, k). The key ``seed + r 2^32`` is one-to-one over
seeds in [0, 2^32) (Lightning's seed range) and ranks < 2^31: no two (seed, rank) pairs share a stream, so a sweep's
seeds stay independent however many ranks each uses, and a single process (rank 0) draws the stream of ``seed``
itself. Runs with the same seed repeat, and the only state a checkpoint needs is ``k`` (the number of batches drawn
so far), which is the same on every rank; a resumed run, whatever its world size, therefore continues exactly where
it stopped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import lightning.pytorch as pl
import torch

from lightning_saferl.data.download import dsrl_dataset_dir, mirror_base, resolve_dataset
from lightning_saferl.data.format import DatasetError, Transitions, read_dataset, read_dims
from lightning_saferl.data.tasks import TaskSpec, get_task
from lightning_saferl.errors import InputError
from lightning_saferl.seeding import SEED_RANGE, rank_stream_key, stream_seed

__all__ = ["OfflineDataModule", "default_cache_dir", "failed_terminations", "point_robot_dataset_path", "task_path"]


def default_cache_dir() -> Path:
    """``$LIGHTNING_SAFERL_CACHE`` if set, else ``~/.cache/lightning_saferl``."""
    env = os.environ.get("LIGHTNING_SAFERL_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/lightning_saferl").expanduser()


def task_path(path: str, task: str) -> str:
    """`path` with ``{task}`` replaced by the task id; any other ``{...}`` field is an error."""
    try:
        return str(path).format(task=task)
    except (KeyError, IndexError, ValueError) as err:
        raise InputError(f"data.path {path!r}: only {{task}} may be written in braces ({err!r})") from None


def point_robot_dataset_path(cache_dir: Union[str, Path], num_transitions: int, seed: int = 0,
                             behavior: str = "mixed") -> Path:
    """File name of a generated PointRobot dataset, named by its generation parameters."""
    return Path(cache_dir) / f"PointRobot-v0_{behavior}_n{num_transitions}_seed{seed}.hdf5"


def failed_terminations(task: TaskSpec, data: Transitions) -> Optional[torch.Tensor]:
    """(N,) float32, 1 at terminations the task counts as failures, or None for tasks without such a rule.
    PointRobot: a termination whose next state is out of bounds (the other termination is the goal)."""
    if task.simulator != "point_robot":
        return None
    from lightning_saferl.envs import point_robot as pr

    left = pr.out_of_bounds(pr.state_from_observation(data.next_observations.double()))
    return ((data.terminals > 0) & left).to(torch.float32)


class _EpochBatches:
    """Iterable of exactly ``steps`` batches drawn from a data module; ``len()`` is ``steps``."""

    def __init__(self, datamodule: "OfflineDataModule", steps: int):
        self.datamodule = datamodule
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(self.steps):
            yield self.datamodule.next_batch()

    # Resumable mid-epoch: the stream position is the datamodule's state (`batches_drawn`, in every checkpoint)
    # and Lightning ends a restored epoch after the batches it still lacks, so the loader itself has no state.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class _FixedBatches:
    """A loader over precomputed batches. Not a list: Lightning would read a list as several dataloaders."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)


class OfflineDataModule(pl.LightningDataModule):
    """Offline dataset of a task, sampled on the training device.

    Args:
        task: task id (see ``lightning_saferl.data.tasks``).
        path: dataset file; ``{task}`` in it stands for the task id (one path serves a sweep over tasks, e.g.
            ``datasets/{task}/{task}.hdf5``, the layout `build-dataset` writes); when None, PointRobot data is
            generated into ``cache_dir`` on first use and DSRL data is looked up in / downloaded to the DSRL cache
            (``$DSRL_DATASET_DIR`` or ``~/.dsrl/datasets``).
        batch_size: transitions per batch.
        steps_per_epoch: batches per epoch.
        seed: seed of the sampling stream, in [0, 2^32) (each rank draws its own: `rank_stream_key`). The
            generated PointRobot data itself always uses data seed 0.
        cache_dir: where generated PointRobot datasets live (default ``$LIGHTNING_SAFERL_CACHE`` or
            ``~/.cache/lightning_saferl``).
        num_transitions: size of the generated PointRobot dataset.
        behavior: behaviour of the generated PointRobot dataset (`lightning_saferl.data.collect`): ``mixed``
            (the default data) or ``scarce`` (safe expert episodes scarce), also ``expert`` / ``random``.
        scale_reward: multiply rewards by max_episode_steps / (R_max - R_min) (DSRL tasks only).
        download: allow downloading a missing DSRL dataset.
        mirror: where DSRL datasets are downloaded from: ``dsrl`` (DSRL's server), ``huggingface`` (the Hugging
            Face dataset repo mirroring DSRL's files), ``hf:<owner>/<repo>`` or a base URL (see
            `lightning_saferl.data.download.mirror_base`).
        sequence_length: K; when set, batches are windows of K steps within an episode (module docstring).
            DSRL's cost-return data augmentation (OSRL's CDT) is not implemented.

    ``obs_dim``/``act_dim`` are known right after construction for PointRobot (from the task registry) and, for
    DSRL tasks, when the file is already present (shapes are read from the HDF5 file, no data); otherwise
    they are None until ``setup()``/``load()``.
    """

    def __init__(
        self,
        task: str = "PointRobot-v0",
        path: Optional[str] = None,
        batch_size: int = 256,
        steps_per_epoch: int = 1000,
        seed: int = 0,
        cache_dir: Optional[str] = None,
        num_transitions: int = 100_000,
        scale_reward: bool = False,
        download: bool = True,
        behavior: str = "mixed",
        mirror: str = "dsrl",
        sequence_length: Optional[int] = None,
    ):
        super().__init__()
        if batch_size < 1 or steps_per_epoch < 1 or num_transitions < 1:
            raise InputError(f"batch_size, steps_per_epoch and num_transitions must be >= 1, got {batch_size}, "
                             f"{steps_per_epoch}, {num_transitions}")
        if path is not None and not str(path).strip():
            raise InputError(f"data.path is empty ({path!r}): give a dataset file, or null for the task's own data")
        if sequence_length is not None and sequence_length < 1:
            raise InputError(f"data.sequence_length must be >= 1 (or null for transitions), got {sequence_length}")
        if not 0 <= int(seed) < SEED_RANGE:
            raise InputError(f"data.seed must be in [0, 2^32) (Lightning's seed range), got {seed}")
        self.save_hyperparameters()
        self.task_spec: TaskSpec = get_task(task)
        self.path = None if path is None else task_path(path, task)
        self.batch_size = int(batch_size)
        self.steps_per_epoch = int(steps_per_epoch)
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.num_transitions = int(num_transitions)
        self.download = bool(download)
        mirror_base(mirror)  # an unknown mirror fails here, not at download time
        self.mirror = mirror
        from lightning_saferl.data.collect import BEHAVIORS

        if behavior not in BEHAVIORS:
            raise InputError(f"data.behavior: unknown behaviour {behavior!r}; choose one of {BEHAVIORS}")
        self.behavior = behavior
        # raises for tasks without reference scores (PointRobot)
        self.reward_scale = self.task_spec.reward_scale_factor if scale_reward else 1.0
        self._data: Optional[Transitions] = None
        self._masks: Optional[torch.Tensor] = None
        self._failures: Optional[torch.Tensor] = None
        self.sequence_length = None if sequence_length is None else int(sequence_length)
        self._episode_columns: Optional[dict[str, torch.Tensor]] = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self.batches_drawn = 0
        self.obs_dim, self.act_dim = self.task_spec.obs_dim, self.task_spec.act_dim
        if self.obs_dim is None or self.act_dim is None:
            existing = self._existing_file()
            if existing is not None:
                self.obs_dim, self.act_dim = read_dims(existing)

    # ----------------------------------------------------------------- task facts
    @property
    def task(self) -> str:
        return self.task_spec.task_id

    @property
    def max_episode_steps(self) -> int:
        return self.task_spec.max_episode_steps

    @property
    def cost_limit(self) -> float:
        return self.task_spec.cost_limit

    # ----------------------------------------------------------------- locating / generating the file
    def _is_generated(self) -> bool:
        return self.path is None and self.task_spec.simulator == "point_robot"

    def _existing_file(self) -> Optional[Path]:
        if self.path is not None:
            return Path(self.path).expanduser()  # read_dims reports a missing file
        if self._is_generated():
            p = point_robot_dataset_path(self.cache_dir, self.num_transitions, behavior=self.behavior)
        elif self.task_spec.dataset_file is not None:
            p = dsrl_dataset_dir() / self.task_spec.dataset_file
        else:
            return None
        return p if p.exists() else None

    def _generate_point_robot(self) -> Path:
        """Generate the PointRobot dataset once (data seed 0), atomically (temp file, then rename)."""
        target = point_robot_dataset_path(self.cache_dir, self.num_transitions, behavior=self.behavior)
        if target.exists():
            return target
        from lightning_saferl.data.collect import collect

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            collect(self.task_spec.task_id, str(tmp), self.num_transitions, seed=0, behavior=self.behavior)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def dataset_path(self) -> Path:
        """The dataset file, generated or downloaded if needed."""
        if self._is_generated():
            return self._generate_point_robot()
        return resolve_dataset(self.task_spec, self.path, download=self.download, mirror=self.mirror)

    def prepare_data(self) -> None:
        """Generate / download the file (Lightning calls this on one process per node)."""
        self.dataset_path()

    # ----------------------------------------------------------------- loading
    def load(self) -> Transitions:
        """Read (generating/downloading first if needed) and validate the dataset once; returns it."""
        if self._data is None:
            path = self.dataset_path()
            try:
                data = read_dataset(path, self.task_spec.obs_dim, self.task_spec.act_dim,
                                    reward_scale=self.reward_scale)
            except DatasetError:
                raise
            except (ValueError, TypeError) as err:  # e.g. a key holding strings: not convertible to float32
                raise DatasetError(f"{path}: cannot read the arrays as numbers ({err}); every DSRL key must hold "
                                   "numeric data") from err
            if self.obs_dim is not None and (data.obs_dim, data.act_dim) != (self.obs_dim, self.act_dim):
                raise DatasetError(f"{path}: dims (obs {data.obs_dim}, act {data.act_dim}) differ "
                                   f"from those read at construction (obs {self.obs_dim}, act {self.act_dim})")
            self.obs_dim, self.act_dim = data.obs_dim, data.act_dim
            self._data = data
            self._masks = data.mask
            self._failures = failed_terminations(self.task_spec, data)
        return self._data

    def setup(self, stage: Optional[str] = None) -> None:
        self.load()

    @property
    def transitions(self) -> Transitions:
        """The whole validated dataset (loads it on first access); on the training device once training began."""
        return self.load()

    def training_device(self) -> torch.device:
        """``trainer.strategy.root_device`` when attached to a trainer, else cpu."""
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    @property
    def global_rank(self) -> int:
        return int(self.trainer.global_rank) if self.trainer is not None else 0

    def _on_device(self, device: torch.device) -> Transitions:
        """Move the dataset to ``device`` (once; the previous copy is dropped)."""
        data = self.load()
        if data.device != device:
            self._data = data.to(device)
            self._masks = self._masks.to(device)
            if self._failures is not None:
                self._failures = self._failures.to(device)
        return self._data

    # ----------------------------------------------------------------- sampling
    def _columns(self) -> dict[str, torch.Tensor]:
        data = self.load()
        cols = {
            "observations": data.observations,
            "actions": data.actions,
            "rewards": data.rewards,
            "costs": data.costs,
            "next_observations": data.next_observations,
            "masks": self._masks,
            "terminals": data.terminals,
        }
        if data.constraint_values is not None:
            cols["constraint_values"] = data.constraint_values
        if self._failures is not None:
            cols["failures"] = self._failures
        return cols

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``index`` (LongTensor on the data's device) as a batch dict; ``index`` is included. In sequence
        mode the windows ending at rows ``index`` (module docstring); ``index`` is then (B, K), padded steps
        pointing at the episode's first row."""
        if self.sequence_length is not None:
            return self.windows(index)
        # index_select: much faster than advanced indexing (v[index]) for 2-D CPU tensors
        out = {k: v.index_select(0, index) for k, v in self._columns().items()}
        out["index"] = index
        return out

    def _episode_facts(self) -> dict[str, torch.Tensor]:
        """Per row, on the data's device (computed once per device): its episode's first row, the returns-to-go and
        costs-to-go  G_i = sum_{j=i..end(i)} x_j = S_i - S_{end(i)+1}  with the suffix sums S (float64)."""
        data = self.load()
        facts = self._episode_columns
        if facts is None or facts["start"].device != data.device:
            episode = data.episode_index()
            n = len(episode)
            rows = torch.arange(n, device=data.device)
            first = torch.ones(n, dtype=torch.bool, device=data.device)
            first[1:] = episode[1:] != episode[:-1]
            start = torch.cummax(torch.where(first, rows, 0), 0).values
            last = torch.ones_like(first)
            last[:-1] = first[1:]
            end = torch.where(last, rows, n).flip(0).cummin(0).values.flip(0)  # last row of the row's episode
            facts = {"start": start}
            for name, values in (("returns_to_go", data.rewards), ("costs_to_go", data.costs)):
                suffix = torch.zeros(n + 1, dtype=torch.float64, device=data.device)
                suffix[:n] = values.double().flip(0).cumsum(0).flip(0)
                facts[name] = (suffix[rows] - suffix[end + 1]).to(values.dtype)
            self._episode_columns = facts
        return facts

    def windows(self, last: torch.Tensor) -> dict[str, torch.Tensor]:
        """Windows of ``sequence_length`` steps ending at rows ``last`` (B,), cut at their episode starts and
        left-padded (module docstring)."""
        facts = self._episode_facts()
        k = self.sequence_length
        rows = last.unsqueeze(1) + torch.arange(1 - k, 1, device=last.device)  # (B, K)
        start = facts["start"].index_select(0, last).unsqueeze(1)
        valid = rows >= start
        rows = torch.maximum(rows, start)
        flat = rows.reshape(-1)
        columns = {**self._columns(), "returns_to_go": facts["returns_to_go"], "costs_to_go": facts["costs_to_go"]}
        out = {}
        for name, values in columns.items():
            picked = values.index_select(0, flat).reshape(*rows.shape, *values.shape[1:])
            out[name] = picked * valid.reshape(*valid.shape, *([1] * (values.dim() - 1))).to(picked.dtype)
        out["timesteps"] = (rows - start) * valid
        out["padding_mask"] = valid
        out["index"] = rows
        return out

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(stream_seed(rank_stream_key(self.seed, self.global_rank), step))
        return gen

    def sample_indices(self, step: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Indices of batch number ``step`` of this rank's stream (uniform over [0, N), with replacement)."""
        device = torch.device(device) if device is not None else self.load().device
        n = len(self.load())
        return torch.randint(0, n, (self.batch_size,), generator=self._generator(device, step), device=device)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of the stream, on the training device (data moved there on first call)."""
        data = self._on_device(self.training_device())
        index = self.sample_indices(self.batches_drawn, data.device)
        self.batches_drawn += 1
        return self.batch(index)

    def full_batch(self, device: Optional[Union[str, torch.device]] = None) -> dict[str, torch.Tensor]:
        """All N rows as one batch dict (keys of training batches, ``index`` = arange(N)) on ``device``
        (default: the training device when attached to a trainer, else where the data is). No copy when the
        data already lives on ``device``."""
        data = self.load()
        if device is None:
            device = self.training_device() if self.trainer is not None else data.device
        device = torch.device(device)
        if self.trainer is not None and device == self.training_device():
            data = self._on_device(device)
        out = {k: v.to(device) for k, v in self._columns().items()}
        out["index"] = torch.arange(len(data), device=device)
        return out

    def train_dataloader(self) -> _EpochBatches:
        """``steps_per_epoch`` batches per epoch (an iterable with ``len``; Lightning accepts it as a loader)."""
        self._on_device(self.training_device())
        return _EpochBatches(self, self.steps_per_epoch)

    def _evaluation_batches(self, stream: int) -> _FixedBatches:
        """One fixed batch (its own seeded stream, independent of training) for validate / test losses."""
        data = self._on_device(self.training_device())
        gen = torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, -stream))
        index = torch.randint(0, len(data), (self.batch_size,), generator=gen).to(data.device)
        return _FixedBatches([self.batch(index)])

    def val_dataloader(self) -> _FixedBatches:
        return self._evaluation_batches(1)

    def test_dataloader(self) -> _FixedBatches:
        return self._evaluation_batches(2)

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The position in the sampling stream (identical on every rank)."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the stream after ``batches_drawn`` batches (the current ``seed`` defines the stream)."""
        self.batches_drawn = int(state_dict["batches_drawn"])
