"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Where the real eegmat recordings live: ../shared/data/eegmat relative to the
#: repository root, unless FEDEEG_EEGMAT_DIR says otherwise.
EEGMAT_DEFAULT_DIR = Path(__file__).parents[2] / "shared" / "data" / "eegmat"


@pytest.fixture(scope="session")
def eegmat_dir() -> Path:
    """The real eegmat folder; skips the test when it is absent."""
    env = os.environ.get("FEDEEG_EEGMAT_DIR")
    path = Path(env).expanduser() if env else EEGMAT_DEFAULT_DIR
    source = "FEDEEG_EEGMAT_DIR" if env else "the default location"
    if not (path / "subject-info.csv").is_file() or not any(path.glob("Subject*_1.edf")):
        pytest.skip(
            f"eegmat data not found at {path} ({source}): needs subject-info.csv and SubjectNN_1/2.edf "
            "(PhysioNet eegmat v1.0.0). Set FEDEEG_EEGMAT_DIR to the folder to run this test."
        )
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Test models are tiny: intra-op threads gain nothing and stall badly on a shared 2-core CPU."""
    import torch

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Runs in tests write their preprocessed-window cache to a temporary folder, never ~/.cache/fedeeg."""
    old = os.environ.get("FEDEEG_CACHE_DIR")
    os.environ["FEDEEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedeeg-cache"))
    yield
    if old is None:
        os.environ.pop("FEDEEG_CACHE_DIR", None)
    else:
        os.environ["FEDEEG_CACHE_DIR"] = old


@pytest.fixture
def flower_task_identity():
    """Messages built outside a running app need Flower's task identity (a SuperNode sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old
