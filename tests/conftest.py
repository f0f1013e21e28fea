"""Test-wide settings: offline hub, deterministic torch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.use_deterministic_algorithms(True)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the tiny models
    gain nothing from threads, and on a busy 2-core machine OpenMP spinning makes them up to 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_generate_tests(metafunc):
    """Any test taking ``fixture_dir`` runs once per parity fixture directory, named by it."""
    if "fixture_dir" in metafunc.fixturenames:
        from tests.parity.conftest import fixture_dirs

        dirs = fixture_dirs()
        metafunc.parametrize("fixture_dir", dirs, ids=[d.name for d in dirs], scope="module")
