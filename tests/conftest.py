import os
import sys
from pathlib import Path

# Triton reads this when a kernel is decorated: set it before anything imports kernels.py.
# There is no GPU here, so every Triton launch in the tests runs in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
