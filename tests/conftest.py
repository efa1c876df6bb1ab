import os
import sys
from pathlib import Path

import pytest

# Triton reads this when a kernel is decorated: set it before anything imports kernels.py.
# There is no GPU here, so every Triton launch in the tests runs in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread is faster than two that wait on each other, and on a busy
    machine much faster. Test files that want it say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
