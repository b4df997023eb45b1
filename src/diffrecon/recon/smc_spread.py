"""One SMC cloud's particles spread over processes (torchrun ranks), bit-identical to one
process (``SMCSolver.spread_over``).

Rank r of W holds the particle rows [r N / W, (r + 1) N / W). Each process:

* draws the WHOLE cloud's noise (N, *shape) from the cloud's one generator and keeps its
  rows (``smc_cloud.Cloud.randn``), so every rank's stream stays in step with a single
  process's and no particle's noise depends on W;
* runs the denoiser, operator and CG on its rows in chunks of ``chunk_size`` rows. With
  N / W a multiple of ``chunk_size`` (checked, :meth:`ParticleGroup.check`) these chunks are
  exactly a single process's chunks (aligned at global multiples of ``chunk_size``), so
  each particle's arithmetic, batched convolutions included, is the same;
* after each step all-gathers, in rank order and in float64, its rows of the weight
  increment, the particles and their state (x0_hat, eps_hat, log G, grad) in ONE collective:
  every rank then holds the whole cloud, computes the same ESS and the same systematic
  resampling indices from the same uniform draw, keeps the lineages (eve ids, (N,)) itself
  and picks its resampled rows; at the end it holds the whole result, so the Reconstruction
  is the one a single process returns (rank 0 writes it in the pipeline).

The exchange is branch-free (no host read of "resampled or not"): the cloud is gathered
every step. Memory per rank: the whole cloud's z, x0_hat, eps_hat (and grad), as in one
process, plus the gathered (N, K) float64 buffer and the (N, *shape) noise draw; spreading
divides the compute (denoiser, operator, CG) by W, not the memory. Collectives: one
all_gather per step of N K float64 values (K = 3 d + 2 for the Gaussian proposal, d = signal
size), gloo (CPU) or nccl (CUDA) alike, no host sync besides them.

Proposals stay agnostic: a proposal sees only its rows (x0_hat, eps_hat, grad of its rows)
and must draw all its noise through ``Cloud.randn`` / ``Cloud.uniform`` and size its
outputs by the rows it is given, never by ``num_particles``; one that needs the whole cloud
gathers it through ``cloud.group.gather`` (the "dds" proposal's steering exponent: one more
collective of 2 N values per step).

Measured (benchmarks/RESULTS.md, section 4): the shipped MRI network's output for a row
changes in the last bits with the batch it runs in (fp32 on the CPU, 16 rows vs 2 x 8: up
to 3e-7), hence the chunk rule; on a 128 px MRI 4x scan, N = 16, 2 ranks write the bits of
one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


class ParticleGroup:
    """The processes one cloud's particles are spread over: this process's ``rank`` of
    ``world``, a torch.distributed process ``group`` (None: the default one), and optional
    hooks: ``wait()`` called before each collective (the pipeline's ``Peers.wait``: a dead
    or hung peer stops this rank with one line instead of a hang) and ``failed(exc)``
    called when a collective raises (it may raise a better error; else the RuntimeError
    propagates)."""

    def __init__(self, rank: int = 0, world: int = 1, group=None,
                 wait: Callable[[], None] | None = None,
                 failed: Callable[[Exception], None] | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.rank, self.world, self.group = int(rank), int(world), group
        self.wait, self.failed = wait, failed

    @classmethod
    def default(cls, **hooks) -> ParticleGroup:
        """The default torch.distributed group (every rank), or one process when none is
        initialised."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return cls(0, 1, **hooks)
        return cls(dist.get_rank(), dist.get_world_size(), **hooks)

    def check(self, num_particles: int, chunk_size: int, name: str = "smc") -> None:
        """ValueError naming the options unless N splits into equal rows per rank and those
        into whole chunks (the condition for a single process's bits)."""
        n, w, c = int(num_particles), self.world, int(chunk_size)
        if n % w:
            raise ValueError(f"{name}: option num_particles={n} does not split over {w} "
                             f"processes; use a multiple of {w}")
        if (n // w) % c and w > 1:
            raise ValueError(f"{name}: option chunk_size={c} does not divide the {n // w} "
                             f"particles per process (num_particles={n} over {w}); use "
                             f"--option chunk_size={_largest_divisor(n // w, c)} (a single "
                             f"process gives the same bits with the same chunk_size)")

    def rows(self, num_particles: int) -> slice:
        """This process's rows of the (N, ...) cloud."""
        per = num_particles // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather(self, *parts: Tensor) -> tuple[Tensor, ...]:
        """Every rank's rows of each (R, ...) tensor, concatenated in rank order: (N, ...)
        each, in one all_gather (float64 on the wire; dtypes kept). One process: the tensors
        themselves."""
        if self.world == 1:
            return parts
        rows, n = parts[0].shape[0], parts[0].shape[0] * self.world
        width = [math.prod(p.shape[1:]) for p in parts]
        flat = torch.cat([p.reshape(rows, k).to(torch.float64)
                          for p, k in zip(parts, width, strict=True)], 1)
        bufs = [torch.empty_like(flat) for _ in range(self.world)]
        if self.wait is not None:
            self.wait()
        try:
            torch.distributed.all_gather(bufs, flat.contiguous(), group=self.group)
        except RuntimeError as exc:  # a peer died inside the collective (gloo: connection)
            if self.failed is not None:
                self.failed(exc)
            raise
        full = torch.cat(bufs, 0).split(width, 1)
        return tuple(f.reshape(n, *p.shape[1:]).to(p.dtype)
                     for f, p in zip(full, parts, strict=True))


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is <= ``at_most``."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


LOCAL = ParticleGroup()  # one process holds every particle

__all__ = ["LOCAL", "ParticleGroup"]
