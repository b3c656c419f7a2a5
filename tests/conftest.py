r"""Suite-wide test settings.

Size of the default selection (`-m 'not slow'`; counted 2026-12-07): 446 collected items from 274 test functions,
each checking a different behaviour; parametrisation adds the other 172 items. Of those, 88 are rows of two cheap
tables (52 partitions of episodes over ranks in `test_rank_slice_partitions_exactly`, 38 registry rows in
`test_every_dsrl_task_is_consistent`), and 29 run one mechanism on further modules (bf16 13, DDP 12, exact resume 7
modules). One more test is marked slow. Recount the functions with
`pytest --collect-only -q | grep :: | sed 's/\[.*//' | sort -u | wc -l`.

Layout: the tests of one subpackage sit in a folder of its name (`actors/`, `callbacks/`, `data/`, `envs/`,
`pipeline/`); tests that go through several (the commands, evaluation, reliability, resume, DDP, bf16) sit here,
with the helpers they share (`tiny_data`, `simulators`, `scripts`), which this directory's place on `sys.path` makes
importable from every folder.
"""
import pytest
import torch

from tiny_data import write_tiny


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    """Tests use tiny tensors, for which a second intra-op thread only adds synchronisation cost (and
    much more when the two cores are shared): run them on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`write_tiny`'s default file, once per test module: 4 episodes of 50 steps, costs only in the last two."""
    return write_tiny(tmp_path_factory.mktemp("data") / "tiny.hdf5")
