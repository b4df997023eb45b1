"""diffrecon: posterior sampling for imaging inverse problems with diffusion priors.

Three contracts (see docs in README): an operator is a deepinv ``Physics``; a prior is a
denoiser ``D(x, sigma) = E[x0 | x0 + sigma * n = x]``; a solver returns a ``Reconstruction``.
"""

__version__ = "0.1.0"
