"""LastCheckpoint.save: a write that fails leaves the previous last.ckpt and no temporary file."""
from types import SimpleNamespace

import pytest

from lightning_saferl.callbacks import LastCheckpoint


class FakeTrainer(SimpleNamespace):
    """The trainer attributes LastCheckpoint.save uses; save_checkpoint writes `payload`, then raises if asked."""

    def save_checkpoint(self, path, weights_only=False):
        with open(path, "wb") as f:
            f.write(self.payload)
        if self.fail:
            raise OSError("No space left on device")


def trainer(step, payload, fail):
    strategy = SimpleNamespace(barrier=lambda name=None: None)
    return FakeTrainer(global_step=step, sanity_checking=False, is_global_zero=True, strategy=strategy,
                       payload=payload, fail=fail)


def test_failed_save_removes_the_temporary_file_and_keeps_the_last_good_checkpoint(tmp_path):
    cb = LastCheckpoint(dirpath=str(tmp_path), every_n_train_steps=1)
    cb.save(trainer(2, b"good state", fail=False))
    assert (tmp_path / "last.ckpt").read_bytes() == b"good state" and cb.saved_step == 2
    with pytest.raises(OSError, match="No space left"):
        cb.save(trainer(4, b"half wri", fail=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no last.ckpt.tmp
    assert (tmp_path / "last.ckpt").read_bytes() == b"good state" and cb.saved_step == 2
