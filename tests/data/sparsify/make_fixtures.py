"""Write the sparsify fixtures with EleutherAI's own library (not run by the tests).

    python -m venv /tmp/sp && /tmp/sp/bin/pip install eai-sparsify==1.3.3   # torch 2.13 kept
    /tmp/sp/bin/python tests/data/sparsify/make_fixtures.py

Each case is a hookpoint folder written by `SparseCoder.save_to_disk` (cfg.json +
sae.safetensors) with random weights, and `expected.safetensors`: inputs `x`, the library's dense
codes (from `encode`) and its output `sae_out` (from `forward`, which adds the skip connection).
"""

from pathlib import Path

import torch
from safetensors.torch import save_file
from sparsify import SparseCoder, SparseCoderConfig

HERE = Path(__file__).parent
D, F, K, N = 16, 64, 4, 12
CASES = {
    "topk/layers.1": SparseCoderConfig(num_latents=F, k=K),
    "groupmax/layers.2": SparseCoderConfig(num_latents=F, k=K, activation="groupmax"),
    "transcoder/layers.1.mlp": SparseCoderConfig(
        num_latents=F, k=K, transcode=True, skip_connection=True
    ),
}

for i, (name, cfg) in enumerate(CASES.items()):
    torch.manual_seed(i)
    sae = SparseCoder(D, cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    folder = HERE / name
    sae.save_to_disk(folder)
    x = torch.randn(N, D) + 0.5
    with torch.no_grad():
        top_acts, top_indices, _ = sae.encode(x)
        codes = torch.zeros(N, sae.num_latents).scatter_(-1, top_indices, top_acts)
        out = sae(x).sae_out
    save_file({"x": x, "codes": codes, "sae_out": out}, str(folder.parent / "expected.safetensors"))
    print(name, tuple(codes.shape), float(out.abs().mean()))
