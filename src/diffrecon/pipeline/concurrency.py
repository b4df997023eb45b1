"""Threads, memory and locks of a run: the fixed intra-op thread count, freed memory kept for
reuse, and the per-output locks.

* Threads: torch's CPU reductions (sums, convolutions, matrix products) split their work by
  the thread count, so the same run on 1 and on 2 threads differs in the last bits (1e-10 on
  a 32 px DDS run, 3e-6 on 64 px). :func:`fixed_threads` sets torch's intra-op threads and
  the BLAS / OpenMP pools numpy and sigpy use (threadpoolctl) to ``RunOptions.threads``
  around each file, whatever OMP_NUM_THREADS says (torchrun sets 1 per rank), so a single
  process and every torchrun rank compute the same bits; the result records the count
  (attribute ``threads``).
* Memory: a DDS step frees the network's activations (tens of MB at 320 x 320) and then
  allocates the data-consistency buffers; glibc's malloc returned the freed heap top to the
  kernel in between, so every network call of a run faulted its activations in again
  (~15,700 page faults, ~60 MB zeroed per call at 320 x 320, 16 coils compressed to 8: about
  10% of the bf16 network time; a loop of bare network calls has none).
  :func:`kept_memory` fixes glibc's mmap threshold at its 64-bit maximum (32 MiB) and its
  trim threshold at 1 GiB within a file's run (55 faults per call), then sets the trim
  threshold to the 64 MiB that glibc's dynamic rule reaches with that mmap threshold and
  trims. Elsewhere than glibc it does nothing.
* Locks: a result ``<name>`` is computed under an exclusive ``flock`` on ``<name>.lock`` in
  the same directory (:func:`output_lock`). A second ``diffrecon run`` on the same outputs
  skips results another run holds and comes back to them at the end (then they are
  complete and skipped), so each result is computed once. The kernel releases a flock when
  its process dies, so a lock file left by a killed run does not block a rerun; the holder
  deletes the lock file when it is done (a waiter that then holds a deleted file's lock
  retries on the new one).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, the atomic writes remain
    fcntl = None

LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Within: torch intra-op threads and the BLAS / OpenMP thread pools at ``n``; restored
    after."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits(limits=int(n)):
        torch.set_num_threads(int(n))
        try:
            yield
        finally:
            torch.set_num_threads(before)


MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # freed heap top kept within a run


@contextlib.contextmanager
def kept_memory() -> Iterator[None]:
    """Within: glibc's malloc keeps freed memory for reuse instead of returning it to the
    kernel (module docstring); a no-op where the C library is not glibc. Process-wide."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)  # fixed: no dynamic rule after this
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
        libc.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h


def _glibc():
    """glibc as a ctypes library (None elsewhere: musl, macOS, Windows)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - glibc under another name
        return None


def lock_path(output: Path) -> Path:
    """The lock file of result ``output``: ``<output>.lock`` beside it."""
    output = Path(output)
    return output.with_name(output.name + LOCK_SUFFIX)


_held: dict[str, list] = {}  # lock path -> [fd, depth]: this process's locks (re-entrant)
_guard = threading.Lock()


@contextlib.contextmanager
def output_lock(output: Path, *, blocking: bool = True,
                on_wait: Callable[[str], None] | None = None) -> Iterator[bool]:
    """Hold the exclusive lock of result ``output`` within (re-entrant in one process).

    Yields True when held. ``blocking=False``: yields False at once when another process
    holds it. Blocking: ``on_wait(message)`` is called once before waiting. Where no lock
    can be taken (no ``fcntl``, a file system without locks, a lock file that cannot be
    created) yields True without one: the atomic writes still keep every result whole.
    """
    key = str(lock_path(output).absolute())
    with _guard:
        if key in _held:
            _held[key][1] += 1
            entered = True
        else:
            entered = False
    if entered:
        try:
            yield True
        finally:
            with _guard:
                _held[key][1] -= 1
        return
    fd = _acquire(Path(key), blocking, on_wait) if fcntl is not None else -1
    if fd is None:
        yield False
        return
    with _guard:
        _held[key] = [fd, 1]
    try:
        yield True
    finally:
        with _guard:
            del _held[key]
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(key)  # still holding it: a waiter re-checks the path (_acquire)
            os.close(fd)


def _acquire(path: Path, blocking: bool, on_wait) -> int | None:
    """An fd holding the flock of ``path`` (the file at ``path`` now), None when another
    process holds it and not ``blocking``, -1 when no lock can be taken."""
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return -1
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    os.close(fd)
                    return None
                if on_wait is not None and not waited:
                    on_wait(f"waiting for {path.name[:-len(LOCK_SUFFIX)]}: another run "
                            f"{_holder(fd)}is computing it")
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            return -1  # ENOLCK and the like: this file system has no locks
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its previous holder deleted while we waited
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _holder(fd: int) -> str:
    """'(pid N) ' from a lock file's content (informational), else ''."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f"(pid {pid}) "
    return ""
