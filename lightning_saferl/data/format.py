"""The DSRL HDF5 dataset format: reading with validation, writing, and the `Transitions` container.

A DSRL file is a flat HDF5 file with one dataset per key, all of the same length N:

    observations (N, obs_dim)   next_observations (N, obs_dim)   actions (N, act_dim)
    rewards (N,)   costs (N,)   terminals (N,)   timeouts (N,)   [constraint_values (N,)]

Conventions: ``done = terminals OR timeouts``, ``mask = 1 - done``, actions are clipped to
``±(1 - 1e-5)`` on read (keeps ``atanh`` and diffusion targets finite). Actions outside [-1, 1] (the action space
every policy acts in) are clipped too, with one warning naming the file, the count and the range: rescale them
if the file's action space is wider. Values are checked after the cast to float32 (and the reward scaling), so
a float64 value beyond float32's range is refused like a NaN, before training.
Files are read with h5py only (no pickle).
"""
from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import h5py
import numpy as np
import torch

from lightning_saferl.errors import InputError

__all__ = [
    "OBSERVATIONS", "NEXT_OBSERVATIONS", "ACTIONS", "REWARDS", "COSTS", "TERMINALS", "TIMEOUTS",
    "CONSTRAINT_VALUES", "REQUIRED_KEYS", "OPTIONAL_KEYS", "ACTION_BOUND",
    "DatasetError", "DatasetWarning", "Transitions", "check_file", "read_dataset", "read_dims", "write_dataset", "validate_arrays",
]

OBSERVATIONS = "observations"
NEXT_OBSERVATIONS = "next_observations"
ACTIONS = "actions"
REWARDS = "rewards"
COSTS = "costs"
TERMINALS = "terminals"
TIMEOUTS = "timeouts"
CONSTRAINT_VALUES = "constraint_values"

REQUIRED_KEYS = (OBSERVATIONS, NEXT_OBSERVATIONS, ACTIONS, REWARDS, COSTS, TERMINALS, TIMEOUTS)
OPTIONAL_KEYS = (CONSTRAINT_VALUES,)
#: actions are clipped to [-ACTION_BOUND, ACTION_BOUND] when read
ACTION_BOUND = 1.0 - 1e-5

_MATRIX_KEYS = (OBSERVATIONS, NEXT_OBSERVATIONS, ACTIONS)  # 2-D: (N, dim)

PathLike = Union[str, "os.PathLike[str]"]


class DatasetError(InputError):
    """A dataset file is missing, unreadable or malformed. The message starts with the file path."""


class DatasetWarning(UserWarning):
    """A dataset value changed on read (actions clipped into the action bounds). The message starts with the path."""


@dataclass
class Transitions:
    """A dataset of N transitions as torch tensors (all of length N).

    ``terminals``/``timeouts`` are float32 in {0, 1}; ``constraint_values`` is None when the dataset has none.
    """

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    costs: torch.Tensor
    next_observations: torch.Tensor
    terminals: torch.Tensor
    timeouts: torch.Tensor
    constraint_values: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def device(self) -> torch.device:
        return self.rewards.device

    @property
    def done(self) -> torch.Tensor:
        """``terminals OR timeouts`` as float32 (N,)."""
        return ((self.terminals > 0) | (self.timeouts > 0)).to(torch.float32)

    @property
    def mask(self) -> torch.Tensor:
        """``1 - done`` (N,): 0 where bootstrapping from ``next_observations`` must stop."""
        return 1.0 - self.done

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-None fields as a dict keyed by their DSRL names."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None}

    def _map(self, fn) -> "Transitions":
        return Transitions(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                              for f in fields(self)})

    def to(self, device: Union[str, torch.device]) -> "Transitions":
        """A copy with every tensor on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return self._map(lambda t: t.to(device))

    def select(self, index: torch.Tensor) -> "Transitions":
        """Rows picked by a boolean mask (N,) or an integer index tensor."""
        index = torch.as_tensor(index, device=self.device)
        return self._map(lambda t: t[index])

    def episode_index(self) -> torch.Tensor:
        """Episode id (LongTensor (N,)) of every row: an episode ends at a ``done`` row or at the last row.

        id[i] = number of episode ends strictly before row i, i.e. ``cumsum(end) - end``.
        """
        ends = self.done.to(torch.long)
        if len(ends) > 0:
            ends[-1] = 1
        return torch.cumsum(ends, 0) - ends

    @property
    def num_episodes(self) -> int:
        idx = self.episode_index()
        return int(idx[-1].item()) + 1 if len(idx) else 0

    def _per_episode_sum(self, values: torch.Tensor) -> torch.Tensor:
        idx = self.episode_index()
        n = int(idx[-1].item()) + 1 if len(idx) else 0
        return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, idx, values)

    def episode_costs(self) -> torch.Tensor:
        """Sum of ``costs`` per episode, shape (num_episodes,)."""
        return self._per_episode_sum(self.costs)

    def episode_returns(self) -> torch.Tensor:
        """Sum of ``rewards`` per episode, shape (num_episodes,)."""
        return self._per_episode_sum(self.rewards)


def _fail(source: Any, problem: str) -> DatasetError:
    return DatasetError(f"{source}: {problem}")


def validate_arrays(arrays: Mapping[str, np.ndarray], source: Any, obs_dim: Optional[int] = None,
                    act_dim: Optional[int] = None) -> None:
    """Check DSRL arrays: required keys, ranks, equal lengths, dims, finite values. Raises DatasetError."""
    if not arrays:
        raise _fail(source, "empty dataset: it contains no keys "
                            f"(expected {', '.join(REQUIRED_KEYS)})")
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise _fail(source, f"missing key(s) {', '.join(repr(k) for k in missing)}; "
                            f"keys found: {sorted(arrays)}")
    keys = [k for k in (*REQUIRED_KEYS, *OPTIONAL_KEYS) if k in arrays]
    for k in keys:
        ndim = np.ndim(arrays[k])
        want = 2 if k in _MATRIX_KEYS else 1
        if ndim != want:
            raise _fail(source, f"key {k!r} has shape {tuple(np.shape(arrays[k]))}; expected a "
                                f"{want}-D array ({'(N, dim)' if want == 2 else '(N,)'})")
    lengths = {k: int(np.shape(arrays[k])[0]) for k in keys}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise _fail(source, f"keys have different lengths (each key must have one row per transition): {listing}")
    if lengths[REWARDS] == 0:
        raise _fail(source, "empty dataset: zero rows")
    obs_shape = np.shape(arrays[OBSERVATIONS])
    next_shape = np.shape(arrays[NEXT_OBSERVATIONS])
    if obs_shape != next_shape:
        raise _fail(source, f"shape mismatch: observations {obs_shape} vs next_observations {next_shape}")
    if obs_dim is not None and obs_shape[1] != obs_dim:
        raise _fail(source, f"observation shape does not match the environment: expected (N, {obs_dim}), "
                            f"found {obs_shape}")
    act_shape = np.shape(arrays[ACTIONS])
    if act_dim is not None and act_shape[1] != act_dim:
        raise _fail(source, f"action shape does not match the environment: expected (N, {act_dim}), "
                            f"found {act_shape}")
    bad = []
    for k in keys:
        a = np.asarray(arrays[k])
        if not np.issubdtype(a.dtype, np.floating):
            continue
        bad += _nonfinite(k, a)
    if bad:
        raise _fail(source, "non-finite values: " + "; ".join(bad))


def _nonfinite(key: str, a: np.ndarray, scale: float = 1.0) -> list[str]:
    """[a description of `key`'s NaN / inf values once cast to float32 and multiplied by `scale`], or []: a finite
    value beyond float32's range (+-3.4e38) counts as inf, since training would see it so."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = a.astype(np.float32) * np.float32(scale)
    finite = np.isfinite(cast).reshape(len(cast), -1).all(axis=1)
    if finite.all():
        return []
    rows = np.flatnonzero(~finite)
    n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    overflow = int((~np.isfinite(cast)).sum()) - n_nan - n_inf
    scaled = f" (times the reward scale {scale:g})" if scale != 1.0 else ""
    beyond = f" and {overflow} finite value(s) beyond float32's range{scaled}" if overflow else ""
    return [f"{key}: {n_nan} NaN and {n_inf} inf value(s){beyond} in {len(rows)} row(s), first at row {rows[0]}"]


def _clip_actions(actions: np.ndarray, source: Any) -> np.ndarray:
    """Actions clipped to +-ACTION_BOUND; one DatasetWarning when some lie outside [-1, 1]."""
    outside = np.abs(actions) > 1.0
    if outside.any():
        warnings.warn(f"{source}: {int(outside.sum())} of {actions.size} action value(s) lie outside the action "
                      f"bounds [-1, 1] (range [{actions.min():.4g}, {actions.max():.4g}]) and are clipped to "
                      "[-1, 1]; rescale the actions to [-1, 1] if the file's action space is wider",
                      DatasetWarning, stacklevel=3)
    return np.clip(actions, -ACTION_BOUND, ACTION_BOUND)


def check_file(path: Union[str, os.PathLike], what: str = "dataset file") -> Path:
    """`path` as a Path once it names an existing, non-empty regular file; else DatasetError saying what is wrong
    (empty path, symlink loop, dangling link, missing, directory, 0 bytes)."""
    if not str(path).strip():
        raise DatasetError(f"{what} path is empty ({str(path)!r}); give the path of the file")
    path = Path(path).expanduser()
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _fail(path, "symlink loop: its symbolic links lead back to themselves; point it at the file") from None
        if path.is_symlink():
            raise _fail(path, f"{what} is a symbolic link to {os.readlink(path)}, which does not exist") from None
        raise _fail(path, f"{what} does not exist") from None
    if path.is_dir():
        raise _fail(path, f"is a directory, not a {what}")
    if path.stat().st_size == 0:
        raise _fail(path, "empty file (0 bytes); a failed or interrupted download?")
    return path


def _not_hdf5(path: Path, e: OSError) -> DatasetError:
    return _fail(path, f"not a readable HDF5 file (h5py: {e}); is it a partial download or a different format?")


def read_dims(path: PathLike) -> tuple[int, int]:
    """(obs_dim, act_dim) from the shapes stored in a DSRL file, without reading the data."""
    path = check_file(path)
    try:
        with h5py.File(path, "r") as f:
            shapes = {k: f[k].shape for k in (OBSERVATIONS, ACTIONS) if isinstance(f.get(k), h5py.Dataset)}
            found = sorted(f.keys())
    except OSError as e:
        raise _not_hdf5(path, e) from e
    for k in (OBSERVATIONS, ACTIONS):
        if k not in shapes:
            raise _fail(path, f"missing key {k!r}; keys found: {found}")
        if len(shapes[k]) != 2:
            raise _fail(path, f"key {k!r} has shape {shapes[k]}; expected a 2-D array (N, dim)")
    return int(shapes[OBSERVATIONS][1]), int(shapes[ACTIONS][1])


def read_dataset(path: PathLike, obs_dim: Optional[int] = None, act_dim: Optional[int] = None,
                 reward_scale: float = 1.0) -> Transitions:
    """Read and validate a DSRL HDF5 file; rewards are multiplied by ``reward_scale``, actions clipped.

    ``obs_dim``/``act_dim``, when given, must match the file's shapes. Every problem raises DatasetError.
    """
    path = check_file(path)
    arrays: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            for k in f.keys():
                if k not in (*REQUIRED_KEYS, *OPTIONAL_KEYS):
                    continue
                if not isinstance(f[k], h5py.Dataset):
                    raise _fail(path, f"key {k!r} is an HDF5 group, expected a dataset (array)")
                arrays[k] = np.asarray(f[k][()])
            found = list(f.keys())
    except OSError as e:
        raise _not_hdf5(path, e) from e
    if not found:
        raise _fail(path, f"empty dataset: the HDF5 file contains no keys (expected {', '.join(REQUIRED_KEYS)})")
    if any(k not in arrays for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if k not in arrays]
        raise _fail(path, f"missing key(s) {', '.join(repr(k) for k in missing)}; keys found: {sorted(found)}")
    validate_arrays(arrays, path, obs_dim, act_dim)
    scaled = _nonfinite(REWARDS, np.asarray(arrays[REWARDS]), float(reward_scale))
    if scaled:
        raise _fail(path, "non-finite values: " + scaled[0])

    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    actions = _clip_actions(np.asarray(arrays[ACTIONS], dtype=np.float32), path)
    return Transitions(
        observations=f32(arrays[OBSERVATIONS]),
        actions=f32(actions),
        rewards=f32(arrays[REWARDS]) * float(reward_scale),
        costs=f32(arrays[COSTS]),
        next_observations=f32(arrays[NEXT_OBSERVATIONS]),
        terminals=f32(np.asarray(arrays[TERMINALS]) != 0),
        timeouts=f32(np.asarray(arrays[TIMEOUTS]) != 0),
        constraint_values=f32(arrays[CONSTRAINT_VALUES]) if CONSTRAINT_VALUES in arrays else None,
    )


def write_dataset(path: PathLike, arrays: Mapping[str, Any], attrs: Optional[Mapping[str, Any]] = None) -> Path:
    """Validate and write DSRL arrays (numpy arrays or CPU tensors) to an HDF5 file; returns the path.

    Floats are stored as float32, terminals/timeouts as bool (as DSRL does); keys other than the DSRL ones
    are rejected. Parent directories are created; the file is written to ``<path>.tmp`` and renamed, so a
    crash never leaves a truncated file at ``path``. ``attrs`` become HDF5 file attributes (metadata).
    """
    path = Path(path)
    unknown = [k for k in arrays if k not in (*REQUIRED_KEYS, *OPTIONAL_KEYS)]
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown}; allowed: {list(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    data = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in arrays.items()}
    validate_arrays(data, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for k, a in data.items():
                if k in (TERMINALS, TIMEOUTS):
                    f.create_dataset(k, data=a != 0)
                else:
                    f.create_dataset(k, data=a.astype(np.float32))
            for name, value in (attrs or {}).items():
                f.attrs[name] = value
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
