"""seed_everything: seeds every RNG in use, and keeps torch-free jobs free of torch's import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from saeflow.utils import seed_everything


def test_seeds_torch_and_numpy_when_torch_is_loaded():
    seed_everything(7)
    a = (torch.rand(3), np.random.rand(3))
    seed_everything(7)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_does_not_import_torch():
    code = "import sys; from saeflow.utils import seed_everything; seed_everything(0); "
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
