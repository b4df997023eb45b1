"""``--spread particles``: under torchrun every rank takes part in every slice's SMC solve,
each holding N / W of its particles (``recon.smc_spread``), instead of ranks taking whole
files or slices. Rank 0 writes the result, the bits a single process writes.

Per file, each rank makes exactly one start exchange (an all_gather of "solve", or of its
record when it skipped or failed before solving), so ranks that disagree stop together;
inside the solves every collective is preceded by ``Peers.wait``, so a rank that dies or
hangs stops the others with one line (``RankLost``); a rank that fails inside a solve
(e.g. CUDA out of memory) tells the others and stops them the same way."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from diffrecon.errors import InputError, RankLost

from .options import RunOptions, make_solver
from .peers import Peers

SPREADS = ("slices", "particles")


def check_spread(options: RunOptions, world: int | None = None) -> None:
    """InputError naming ``--spread`` unless it is a known mode and, for 'particles', the
    solver is smc and its N particles split into whole ``chunk_size`` chunks over the
    ``world`` processes (default: torchrun's WORLD_SIZE); before any work."""
    from diffrecon.recon.smc_spread import ParticleGroup

    if options.spread not in SPREADS:
        raise InputError(f"--spread {options.spread!r} is not valid; expected "
                         f"{' or '.join(SPREADS)}")
    if options.spread != "particles":
        return
    if options.solver != "smc":
        raise InputError(f"--spread particles spreads one SMC cloud's particles over the "
                         f"torchrun ranks and needs --solver smc, got --solver "
                         f"{options.solver or 'default'}")
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    opts = make_solver("smc", options).options
    try:
        ParticleGroup(0, max(world, 1)).check(opts.num_particles, opts.chunk_size)
    except ValueError as exc:
        raise InputError(f"--spread particles: {exc}") from None


@dataclass
class ParticleShard:
    """One file under ``--spread particles``: every slice on every rank, each solve spread
    over the ranks; rank 0 writes. Used by ``run.reconstruct_planned`` like
    ``batch.SliceShard``."""

    rank: int
    world: int
    peers: Peers
    gathered: bool = False   # the start exchange happened
    solving: bool = False    # between the start exchange and the end of the solves
    lockstep = True          # a rank cannot redo a solve alone (no out-of-memory retry)

    def mine(self, indices: range) -> range:
        """Every slice, after the start exchange (ranks that disagree stop here)."""
        parts = self.exchange(("solve",))
        bad = next((p for p in parts if p != ("solve",)), None)
        if bad is not None:
            if bad[0] == "error":
                raise (InputError if bad[1] == "input" else RuntimeError)(bad[2])
            raise RuntimeError("ranks disagree on whether the file needs reconstructing")
        self.solving = True
        return indices

    def exchange(self, payload) -> list:
        self.gathered = True
        return self.peers.all_gather(payload)

    def solver(self, solver):
        """``solver`` spread over the ranks (collectives behind ``Peers.wait``)."""
        from diffrecon.recon.smc_spread import ParticleGroup

        return solver.spread_over(ParticleGroup(self.rank, self.world, wait=self.peers.wait,
                                                failed=self._failed))

    def _failed(self, exc: Exception) -> None:
        self.peers.check()  # a dead peer: its RankLost line
        first = " ".join(str(exc).split())[:160]
        raise RankLost(f"rank {self.rank}: a collective failed ({first}); complete results "
                       f"are kept, rerun to resume") from None

    def gather(self, results: dict) -> dict | None:
        """The results (every rank holds them all): rank 0's to write, None elsewhere."""
        self.solving = False
        return results if self.rank == 0 else None


def spread_file(path: Path, out: Path, options: RunOptions, progress, rank: int, world: int,
                peers: Peers) -> tuple:
    """One file under ``--spread particles``; every rank returns rank 0's record."""
    from .batch import guard, warnings_unless_failed
    from .run import reconstruct_file

    shard = ParticleShard(rank, world, peers)
    with warnings_unless_failed():
        record = guard(reconstruct_file, path, out, options, progress=progress, shard=shard)
    if shard.solving:  # failed inside a solve: the others may wait in its step loop, so
        # no collective; stop (no closing barrier) and tell them why (Peers.leave). An input
        # error (every rank has it) keeps its one line and exit code 2.
        kind, msg = record[1], record[2]
        lost = RankLost(msg if kind == "input" else f"rank {rank}: {msg}; complete results "
                                                    f"are kept, rerun to resume")
        lost.exit_code, lost.reason = (2 if kind == "input" else 1), f"failed ({msg[:160]})"
        raise lost
    if not shard.gathered:  # skipped or failed before solving: still take the start exchange
        parts = shard.exchange(record)
        if ("solve",) in parts:
            record = ("error", "internal", "ranks disagree on whether the file needs "
                                           "reconstructing")
        record = next((p for p in parts if p[0] == "error"), record)
    peers.wait()  # rank 0 has written the result
    box = [record]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


__all__ = ["SPREADS", "ParticleShard", "check_spread", "spread_file"]
