"""torchrun plumbing: process-group set-up and the peer watch (heartbeats through the
store) that turns a dead or hung rank into one ``RankLost`` line on the others.
Re-exported by :mod:`diffrecon.pipeline.batch`."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
import threading
import time
from pathlib import Path

import torch

from diffrecon.errors import Interrupted, RankLost


def init_distributed() -> tuple[int, int, bool]:
    """Initialise torch.distributed under torchrun (``WORLD_SIZE`` > 1): gloo on CPU, nccl
    on CUDA. Returns (rank, world size, whether this call initialised it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return 0, 1, False
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # every collective is entered only once all ranks have reached it (Peers.wait), so this
    # bounds a collective itself, not the wait for a slow rank
    torch.distributed.init_process_group(backend=backend,
                                         timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), True


COLLECTIVE_TIMEOUT_S = 600


class Peers:
    """The other torchrun ranks, watched through the process group's store, so that a rank
    that died or hangs stops the others with one line (``RankLost``) instead of leaving
    them in a collective.

    Each rank bumps a heartbeat counter every second (a daemon thread) and publishes its
    host and pid. A rank checks its peers after every file and while it waits for them
    before a collective (:meth:`wait`): a peer that left (stopped by a signal), whose process
    is gone (same host), or whose heartbeat has not moved for ``timeout`` seconds
    (``--rank-timeout``) is lost. Waiting for a slow but live peer has no time limit.
    """

    BEAT_S = 1.0

    def __init__(self, rank: int, world: int, timeout: float, store=None):
        from torch.distributed.distributed_c10d import _get_default_store

        self.rank, self.world, self.timeout = rank, world, float(timeout)
        self.store = torch.distributed.PrefixStore("diffrecon/", store or _get_default_store())
        self.seen: dict[int, tuple[int, float]] = {}
        self.where: dict[int, tuple[str, int]] = {}
        self.calls = 0
        self._stop = threading.Event()
        self._op(self.store.set, f"who/{rank}", f"{_host_id()} {os.getpid()}")
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name="diffrecon-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.BEAT_S):
            try:
                self.store.add(f"beat/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the main thread reports it
                return

    def _op(self, fn, *args):
        """A store operation; a store that is gone (its host died) is a lost rank."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - c10d raises RuntimeError / DistStoreError
            first = " ".join(str(exc).split())[:160]
            raise RankLost(f"rank {self.rank}: lost contact with the torchrun store (its "
                           f"host, the launcher or rank 0, has died: {first}); complete "
                           f"results are kept, rerun to resume") from None

    def check(self) -> None:
        """``RankLost`` when a peer left, died or has not beaten for ``timeout`` seconds."""
        for r in range(self.world):
            if r != self.rank:
                self._check(r)

    def _check(self, r: int) -> None:
        lost = None
        if self._op(self.store.check, [f"left/{r}"]):
            lost = f"rank {r} {self._op(self.store.get, f'left/{r}').decode()}"
        else:
            beat, now = int(self._op(self.store.add, f"beat/{r}", 0)), time.monotonic()
            last = self.seen.get(r)
            if last is None or beat != last[0]:
                self.seen[r] = (beat, now)
            elif now - last[1] > self.timeout:
                lost = f"rank {r} has not answered for {now - last[1]:.0f} s (--rank-timeout)"
            if lost is None and r not in self.where and self._op(self.store.check,
                                                                 [f"who/{r}"]):
                host, pid = self._op(self.store.get, f"who/{r}").decode().rsplit(" ", 1)
                self.where[r] = (host, int(pid))
            if lost is None and r in self.where:
                host, pid = self.where[r]
                if host == _host_id() and not _alive(pid):
                    lost = f"rank {r} (pid {pid}) has died"
        if lost is not None:
            raise RankLost(f"rank {self.rank}: stopping because {lost}; complete results are "
                           f"kept, rerun to resume")

    def wait(self) -> None:
        """Return when every rank has reached this call (the n-th call of each rank),
        checking the peers meanwhile; call before each collective."""
        self.calls += 1
        keys = [f"at/{self.calls}/{r}" for r in range(self.world)]
        self._op(self.store.set, keys[self.rank], "1")
        while not self._op(self.store.check, keys):
            self.check()
            time.sleep(0.1)

    def all_gather(self, payload) -> list:
        """Every rank's ``payload`` (picklable), in rank order."""
        self.wait()
        parts: list = [None] * self.world
        try:
            torch.distributed.all_gather_object(parts, payload)
        except RuntimeError as exc:  # a peer died inside the collective (gloo: connection)
            self.check()
            first = " ".join(str(exc).split())[:160]
            raise RankLost(f"rank {self.rank}: a collective failed ({first}); complete "
                           f"results are kept, rerun to resume") from None
        return parts

    def leave(self, exc: BaseException) -> None:
        """Tell the peers why this rank stops (best effort); under torchrun a SIGTERM
        usually means the launcher stops every rank because one failed: the message then
        names the lost rank when it can."""
        reason = getattr(exc, "reason", None) or ("was stopped" if isinstance(exc, RankLost)
                                                  else f"was {exc}".split(";")[0])
        with contextlib.suppress(Exception):
            self.store.set(f"left/{self.rank}", reason)
        if isinstance(exc, Interrupted):
            what, cause = exc.args[0].split(";")[0], ""
            try:
                self.check()
            except RankLost as lost:
                cause = str(lost).split(";")[0].split("because ", 1)[-1]
            except Exception:  # noqa: BLE001 - best effort
                pass
            why = f" after {cause} (torchrun stops every rank when one fails)" if cause else ""
            exc.args = (f"rank {self.rank}: {what}{why}; complete results are kept, rerun "
                        f"to resume",)

    def close(self) -> None:
        self._stop.set()


@functools.cache
def _host_id() -> str:
    """This machine: host name and boot id (pids are comparable only within one)."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{socket.gethostname()}/{boot}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True
