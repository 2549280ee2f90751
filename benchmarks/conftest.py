import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # one torch thread, as run.py's CPU tables (its --threads default): with torch's own
    # choice, OpenMP threads contending on a busy 2-core machine made the Glow train step
    # 750 ms instead of 31 and the pytest-benchmark table a measure of the contention
    torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))
