"""Priors: denoisers D(x, sigma) = E[x0 | x0 + sigma n = x] with metadata.

    prior = diffrecon.priors.load("phantom-mri")          # shipped, offline
    prior = diffrecon.priors.load("ffhq_10m.pt")          # a published checkpoint, local file
    prior = diffrecon.priors.load("knee.pt", config="fastmri_knee_320_complex.yml")
    diffrecon.priors.convert("edm.pkl", "edm.pt", trust_pickle=True)  # safe file + card
    diffrecon.priors.describe(prior)                       # what was inferred
    gmm = diffrecon.priors.GaussianMixture(means, weights) # exact, for tests and research

Names are resolved lazily so ``import diffrecon.priors`` stays cheap.
"""

from __future__ import annotations

import importlib

from .base import Prior

_LAZY = {
    "GaussianMixture": "analytic",
    "Gaussian": "analytic",
    "mcgdiff_problem": "analytic",
    "sliced_wasserstein": "analytic",
    "mixture_weight_tv": "analytic",
    "VPEpsPrior": "adapters",
    "VEScorePrior": "adapters",
    "EDMPrior": "adapters",
    "VPredictionPrior": "adapters",
    "DeepinvDenoiserPrior": "adapters",
    "DiffusersPrior": "adapters",
    "load": "registry",
    "available": "registry",
    "KINDS": "registry",
    "convert": "checkpoints",
    "describe": "checkpoints",
    "detect_kind": "checkpoints",
    "NetworkPrior": "network",
    "load_network_prior": "network",
    "save_network_prior": "network",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Prior", *_LAZY]
