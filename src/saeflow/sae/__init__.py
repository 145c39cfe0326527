"""Sparse autoencoders: loading the published formats, encoding, metrics and organism training.

`load_sae(spec)` returns a `SAE` (per-token: ReLU, TopK, JumpReLU) or a `TemporalSAE`; both share
`d_in`, `d_sae`, `is_temporal`, `forward(x) -> SAEOutput(novel, pred, recon)` and
`decoder_directions()`. Encoding to disk, metrics and training live in `saeflow.sae.encode`,
`saeflow.sae.metrics` and `saeflow.sae.train` (imported on use, they pull in more dependencies).
"""

from saeflow.sae.formats import load_sae
from saeflow.sae.models import SAE, BaseSAE, SAEOutput, check_sae_matches
from saeflow.sae.temporal import TemporalSAE

__all__ = ["SAE", "BaseSAE", "SAEOutput", "TemporalSAE", "check_sae_matches", "load_sae"]
