"""Resumable runs: the settings fingerprint of a job, the status of its output file, and
the cleanup of temporaries left by killed runs.

A result stores ``settings`` (input checksum, solver and its options, prior, seed, ...) and
their sha256 ``settings_sha256``; a rerun with the same fingerprint skips the file, one with
another fingerprint refuses to replace it unless told to overwrite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from diffrecon.errors import InputError


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 (hex) of the settings as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def output_status(output: Path, digest: str) -> str:
    """'missing', 'complete' (a result with the same settings digest), 'different' (a result
    made with other settings or input) or 'unreadable' (not a diffrecon result)."""
    if not output.exists():
        return "missing"
    try:
        import h5py

        with h5py.File(output, "r") as f:
            if "reconstruction" not in f:
                return "unreadable"
            stored = f.attrs.get("settings_sha256")
    except (OSError, ValueError):
        return "unreadable"
    if isinstance(stored, bytes):
        stored = stored.decode()
    return "complete" if stored == digest else "different"


def existing_result(output: Path, digest: str, overwrite: bool) -> bool:
    """True when a complete result with these settings exists (skip the job); raises
    ``InputError`` when ``output`` holds anything else, unless ``overwrite``."""
    if overwrite:
        return False
    status = output_status(output, digest)
    if status == "complete":
        return True
    if status != "missing":
        what = ("was made with different settings or input" if status == "different"
                else "exists and is not a diffrecon result file")
        raise InputError(f"{output}: output {what}; pass --overwrite to replace it")
    return False


def remove_stale_temporaries(output: Path, cache: Path | None = None) -> list[Path]:
    """Delete ``<output>.tmp-<pid>`` files (and ``*.tmp-<pid>`` files in the directory
    ``cache``, the ESPIRiT cache) left by killed runs: those whose pid is not alive."""
    found = list(output.parent.glob(f"{output.name}.tmp-*"))
    if cache is not None and cache.is_dir():
        found += cache.glob("*.tmp-*")
    removed = []
    for tmp in found:
        pid = tmp.name.rsplit("-", 1)[-1]
        alive = False
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
        if not alive:
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed
