"""Many inputs: files and directories, their result paths, failure isolation, and torchrun
sharding (files round-robin over ranks, or one file's slices)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffrecon.errors import InputError, Interrupted

from .options import RunOptions
from .peers import (  # noqa: F401  (re-exported: old import path)
    COLLECTIVE_TIMEOUT_S,
    Peers,
    _alive,
    _host_id,
    init_distributed,
)
from .run import Progress, planned, reconstruct_file, reconstruct_planned
from .spread import check_spread, spread_file

SCAN_SUFFIXES = (".h5", ".hdf5")


def is_result_file(path: Path) -> bool:
    """True for a diffrecon result file, recognised by its provenance (a ``reconstruction``
    dataset and the ``settings_sha256`` / ``diffrecon_version`` attributes the pipeline
    writes), never by its name; unreadable files are not results (the reader says why)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return ("reconstruction" in f and "settings_sha256" in f.attrs
                    and "diffrecon_version" in f.attrs)
    except (OSError, ValueError):
        return False


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files and directories (their ``*.h5`` / ``*.hdf5`` scan files, sorted, not recursive;
    diffrecon result files in a directory are skipped, so a batch whose output directory is
    its input directory can be rerun), de-duplicated in order."""
    if not inputs:
        raise InputError("no INPUT given; expected scan files or directories")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix in SCAN_SUFFIXES and q.is_file())
            scans = [q for q in found if not is_result_file(q)]
            if not scans:
                what = "only diffrecon result files" if found else "no .h5/.hdf5 scan files"
                raise InputError(f"{p}: directory holds {what}")
            files.extend(scans)
        elif p.exists():
            files.append(p)
        elif os.path.islink(p):  # dangling or looping: check_readable_file says which
            from diffrecon.datasets.safe_open import check_readable_file

            check_readable_file(p, "a scan file or directory")
        else:
            raise InputError(f"{p}: no such file or directory")
    seen, out = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def output_paths(inputs: Sequence[str | os.PathLike], files: list[Path],
                 output: str | os.PathLike) -> list[Path]:
    """Result path per input file: ``output`` itself for one input file, else (or when
    ``output`` is a directory or ends with a path separator, 'results/')
    ``output/<stem>_recon.h5`` (the directory is created). Checked before any work, whatever
    ``--overwrite`` says: no result path may be (or replace) an input of the run, and no two
    inputs may share a result path (``InputError`` naming both)."""
    as_dir = str(output).endswith(("/", os.sep))
    output = Path(output)
    many = len(files) > 1 or Path(inputs[0]).is_dir() or output.is_dir() or as_dir
    if not many:
        targets = [output]
    else:
        if output.exists() and not output.is_dir():
            raise InputError(f"-o/--output {output} is a file, but several inputs need a "
                             f"directory")
        targets = [output / f"{f.stem}_recon.h5" for f in files]
    check_targets(files, targets)
    if many:
        parent = output.parent if str(output.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(f"-o/--output {output}: directory {parent} does not exist")
        if not output.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"-o/--output {output}: directory {parent} is not writable")
            output.mkdir(exist_ok=True)
    return targets


def check_targets(files: Sequence[Path], targets: Sequence[Path]) -> None:
    """``InputError`` when a result path is an input of the run (same path, link or name up
    to case, as on case-insensitive file systems) or two inputs share a result path."""
    def key(p: Path) -> str:
        return str(p.resolve()).casefold()

    by_key = {key(f): f for f in files}
    owner: dict[str, Path] = {}
    for f, t in zip(files, targets, strict=True):
        clash = by_key.get(key(t))
        if clash is None and t.exists():
            clash = next((g for g in files if os.path.samefile(g, t)), None)
        if clash is not None:
            raise InputError(f"-o/--output: the result of {f} would be {t}, which is the input "
                             f"{clash}; inputs are never replaced, choose another -o")
        first = owner.setdefault(key(t), f)
        if first is not f:
            raise InputError(f"inputs {first} and {f} would both write {t}; rename one or "
                             f"run them with separate -o directories")


def failure(exc: Exception) -> tuple:
    """A picklable ('error', kind, message) record of an exception, so that every rank can
    learn about a failure instead of deadlocking in a collective; kind 'input' for
    ``InputError``, else 'internal'."""
    if isinstance(exc, InputError):
        return ("error", "input", str(exc))
    return ("error", "internal", f"{type(exc).__name__}: {exc}")


@contextlib.contextmanager
def warnings_unless_failed() -> Iterator[None]:
    """Within: the warnings raised (numpy / sigpy RuntimeWarnings, ...) are held back, then
    re-issued when the block completes and dropped when it raises, so that a failure is
    reported by its one error line alone."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def guard(fn, *args, **kwargs) -> tuple:
    """('ok', fn(...)) or the :func:`failure` record of its exception."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - re-raised after the collective
        return failure(exc)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGTERM (and SIGINT) raise ``errors.Interrupted`` in the main thread, so that
    the run stops at once, the result being written loses its temporary file (atomic_h5) and
    the CLI exits 143 (130) with one line; complete results stay, a rerun resumes. Handlers a
    caller installed are left alone; outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    _RECEIVED.clear()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _RECEIVED.clear()


# Signals received inside stop_on_signals. The handler's exception can be swallowed where
# Python ignores exceptions (a finalizer or weakref callback the garbage collector runs at
# that moment prints "Exception ignored in ..." and goes on); raise_if_interrupted, called
# between files, stops the run then.
_RECEIVED: list[int] = []


def _raise_interrupted(signum, frame):
    _RECEIVED.append(signum)
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise ``errors.Interrupted`` if a signal arrived inside :func:`stop_on_signals`
    whose exception was lost on the way."""
    if _RECEIVED:
        raise Interrupted(_RECEIVED[0])


def reconstruct_many(inputs: Sequence[str | os.PathLike], output: str | os.PathLike,
                     options: RunOptions | None = None, *, progress: Progress | None = None,
                     **overrides) -> list[dict[str, Any]]:
    """Reconstruct files and directories; resumable (complete outputs are skipped, each
    output is written atomically, a killed run leaves no partial result).

    One input file: ``output`` is the result file (or an existing directory to hold
    ``<stem>_recon.h5``); several inputs or a directory: ``output`` is a directory
    (created). A file that fails does not stop the others; at the end the first failure is
    raised (``InputError`` for input problems). Under torchrun (``WORLD_SIZE`` > 1) files
    are sharded round-robin across ranks, or for a single file its slices; with
    ``spread='particles'`` (SMC) every rank takes part in every solve, holding N / W of
    each cloud's particles (``pipeline.spread``); every rank returns all summaries in input
    order. ``options`` / ``overrides`` as in
    :func:`reconstruct_file`.

    Concurrent runs on one output directory compute each result once: an output whose lock
    (``<output>.lock``, ``concurrency.output_lock``) another run holds is put off to the end
    and then waited for. Under torchrun a rank that dies or stops answering
    (``rank_timeout``) stops the others with ``errors.RankLost`` (:class:`Peers`).
    """
    opts = RunOptions.of(options, **overrides)
    check_spread(opts)
    files = collect_inputs(inputs)
    targets = output_paths(inputs, files, output)
    rank, world, owned = init_distributed()
    peers = None
    with stop_on_signals():
        stopped = False
        try:
            peers = Peers(rank, world, opts.rank_timeout) if world > 1 else None
            if world > 1 and opts.spread == "particles":  # every file on every rank
                records = [spread_file(f, t, opts, progress, rank, world, peers)
                           for f, t in zip(files, targets, strict=True)]
            elif world > 1 and len(files) == 1:
                records = [_sharded_file(files[0], targets[0], opts, progress, rank, world,
                                         peers)]
            else:
                # an output another run holds (its lock) is put off to the end, then waited
                # for: concurrent runs share the work (inline: the run -> denoiser call
                # depth is bounded, tests/test_cli.py)
                queue = [(i, f, t, False) for i, (f, t) in enumerate(zip(files, targets,
                                                                          strict=True))
                         if i % world == rank]
                local = []
                while queue:
                    raise_if_interrupted()
                    i, f, target, wait = queue.pop(0)
                    try:  # a failing file does not stop the others
                        with warnings_unless_failed(), planned(f, target, opts, progress,
                                                               wait=wait) as plan:
                            if plan is None:
                                queue.append((i, f, target, True))
                                continue
                            local.append((i, ("ok", reconstruct_planned(plan, progress))))
                    except Exception as exc:  # noqa: BLE001 - reported at the end
                        local.append((i, failure(exc)))
                    if peers is not None:
                        peers.check()  # a lost rank stops this one (RankLost)
                raise_if_interrupted()
                if world > 1:
                    local = [item for part in peers.all_gather(local) for item in part]
                records = [r for _, r in sorted(local, key=lambda t: t[0])]
        except KeyboardInterrupt as exc:  # errors.Interrupted, RankLost
            stopped = True
            if peers is not None:
                peers.leave(exc)
            raise
        finally:
            if peers is not None:
                peers.close()
            if owned:  # barrier first: a rank tearing gloo down while its peer is still inside
                if not stopped:  # the last collective aborts the peer (SIGABRT)
                    torch.distributed.barrier()
                torch.distributed.destroy_process_group()
    errors = [r for r in records if r[0] == "error"]
    if errors:
        n = f" ({len(errors)} of {len(records)} inputs failed)" if len(records) > 1 else ""
        kind, msg = errors[0][1], errors[0][2]
        raise (InputError if kind == "input" else RuntimeError)(msg + n)
    return [r[1] for r in records]


@dataclass
class SliceShard:
    """One file's slices split over torchrun ranks: rank r solves slices r::world, and every
    rank takes part in exactly one ``exchange`` (all_gather) of its outcome."""

    rank: int
    world: int
    peers: Peers
    gathered: bool = False

    def mine(self, indices: range) -> range:
        return indices[self.rank::self.world]

    def solver(self, solver):
        """The solver a rank runs its slices with: ``solver`` itself."""
        return solver

    def exchange(self, payload) -> list:
        """The payloads of every rank (a collective)."""
        self.gathered = True
        return self.peers.all_gather(payload)

    def gather(self, results: dict) -> dict | None:
        """Every rank's slice results merged on rank 0 (None on the others); a rank's
        failure is raised on every rank."""
        parts = self.exchange(("slices", results))
        bad = next((p for p in parts if p[0] != "slices"), None)
        if bad is not None:
            if bad[0] == "error":
                raise (InputError if bad[1] == "input" else RuntimeError)(bad[2])
            raise RuntimeError("ranks disagree on whether the file needs reconstructing")
        if self.rank != 0:
            return None
        return {k: v for _, part in parts for k, v in part.items()}


def _sharded_file(path: Path, out: Path, options: RunOptions, progress, rank: int,
                  world: int, peers: Peers) -> tuple:
    """One file under torchrun: rank r solves slices r::world, rank 0 writes the result;
    every rank returns rank 0's record."""
    shard = SliceShard(rank, world, peers)
    with warnings_unless_failed():
        record = guard(reconstruct_file, path, out, options, progress=progress, shard=shard)
    if not shard.gathered:  # skipped or failed before solving: still take part
        record = next((p for p in shard.exchange(record) if p[0] == "error"), record)
    peers.wait()  # rank 0 has written the result
    box = [record]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
