"""``Calibration``: the calibrated multipliers of one task, the intervals and RMSE bounds
they give a new result, and their JSON file (written atomically; read with one-line
``InputError`` naming the file and key). The guarantee: ``diffrecon.calibration``."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffrecon.errors import InputError

from .conformal import UNITS, posterior_std, spread

FORMAT = "diffrecon-calibration"
VERSION = 1
METHOD = "conformal-risk-control"
SCORE = ("|reference - mean| / (sqrt(G_smooth * std^2) + floor * max|mean| of the slice); "
         "G_smooth: Gaussian window of std 'smooth' pixels (0: none)")


@dataclass(frozen=True)
class Calibration:
    """Calibrated interval multipliers for one task (see ``diffrecon.calibration``).

    scales: level -> lam, interval ``mean +- lam * u``; rmse_factors: level -> q, bound
    ``RMSE <= q * sqrt(mean u^2)`` per slice; floor, smooth: see :func:`spread` (smooth 0
    in files written before it existed); unit, n_units,
    n_slices: the exchangeable unit and the calibration set's size; foreground: the mask
    fraction used (None: all pixels); task: what it applies to (modality, solver, options,
    prior name and checksum, acceleration / views, ...); diagnostics: calibration-set
    figures (Gaussian ``z * std`` coverage before, in-sample coverage after, std / RMSE).
    """

    scales: dict[float, float]
    rmse_factors: dict[float, float]
    floor: float
    unit: str
    n_units: int
    n_slices: int
    foreground: float | None = None
    task: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    diagnostics: dict[str, Any] = field(default_factory=dict)
    smooth: float = 0.0
    method: str = METHOD
    version: int = VERSION

    @property
    def levels(self) -> tuple[float, ...]:
        return tuple(sorted(self.scales))

    def intervals(self, mean, std_or_samples, levels: Sequence[float] | None = None
                  ) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        """``{level: (lower, upper)}``, each of ``mean``'s shape and float dtype."""
        mean = np.asarray(mean)
        u = spread(mean, posterior_std(mean, std_or_samples), self.floor, self.smooth)
        dtype = mean.dtype if mean.dtype.kind == "f" else np.float64
        out = {}
        for level in self.levels if levels is None else levels:
            lam = self._get(self.scales, level)
            out[float(level)] = ((mean - lam * u).astype(dtype), (mean + lam * u).astype(dtype))
        return out

    def rmse_bounds(self, mean, std_or_samples, levels: Sequence[float] | None = None
                    ) -> dict[float, np.ndarray]:
        """``{level: (slices,) upper bounds on each slice's RMSE}`` in the mean's units."""
        mean = np.asarray(mean)
        u = spread(mean, posterior_std(mean, std_or_samples), self.floor, self.smooth)
        rms = np.sqrt(np.mean(u.reshape(u.shape[0], -1) ** 2, axis=1))
        return {float(lv): self._get(self.rmse_factors, lv) * rms
                for lv in (self.levels if levels is None else levels)}

    def _get(self, table: Mapping[float, float], level) -> float:
        for k, v in table.items():
            if math.isclose(k, float(level), abs_tol=1e-9):
                return v
        raise ValueError(f"level {float(level):g} is not calibrated; calibrated levels: "
                         f"{', '.join(f'{k:g}' for k in sorted(table))}")

    def check_task(self, task: Mapping[str, Any], where: str = "calibration") -> None:
        """Raise ``InputError`` naming the first key whose value differs from ``task``."""
        for key in sorted(set(self.task) | set(task)):
            a, b = self.task.get(key), task.get(key)
            if a != b:
                raise InputError(f"{where}: calibrated for {key}={a!r}, this run has "
                                 f"{key}={b!r}; calibrate for this task")

    # ------------------------------------------------------------------ file format
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "method": self.method,
                "score": SCORE, "floor": self.floor, "smooth": self.smooth,
                "scales": {repr(k): v for k, v in sorted(self.scales.items())},
                "rmse_factors": {repr(k): v for k, v in sorted(self.rmse_factors.items())},
                "unit": self.unit, "n_units": self.n_units, "n_slices": self.n_slices,
                "foreground": self.foreground, "task": dict(self.task),
                "created": self.created, "diagnostics": self.diagnostics}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file atomically (``<path>.tmp-<pid>``, fsync, ``os.replace``)."""
        p = Path(path)
        if not p.parent.exists():
            raise InputError(f"{p}: output directory {p.parent} does not exist")
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
        tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read and validate a calibration file; problems raise a one-line ``InputError``
        naming the file and the key."""
        from diffrecon.datasets.safe_open import check_readable_file

        p = check_readable_file(path, "a calibration file")  # a FIFO or device: unopened
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{p}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{p}: not a calibration file ({exc})") from None
        return cls.from_dict(d, str(p))

    @classmethod
    def from_dict(cls, d: Any, where: str = "calibration") -> Calibration:
        def bad(key: str, what: str) -> InputError:
            return InputError(f"{where}: key '{key}' {what}")

        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise bad("format", f"must be {FORMAT!r}")
        if d.get("version") != VERSION:
            raise bad("version", f"is {d.get('version')!r}, this diffrecon reads {VERSION}")
        if d.get("method") != METHOD:
            raise bad("method", f"is {d.get('method')!r}, expected {METHOD!r}")

        def number(key: str, value: Any, lo: float = 0.0) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < lo:
                raise bad(key, f"must be a finite number >= {lo:g}, got {value!r}")
            return float(value)

        def table(key: str) -> dict[float, float]:
            t = d.get(key)
            if not isinstance(t, dict) or not t:
                raise bad(key, "must be a non-empty mapping of level -> factor")
            out = {}
            for k, v in t.items():
                try:
                    level = float(k)
                except ValueError:
                    raise bad(key, f"has level {k!r} that is not a number") from None
                if not 0 < level < 1:
                    raise bad(key, f"has level {k!r} outside (0, 1)")
                out[level] = number(f"{key}.{k}", v)
            return out

        scales, rmse = table("scales"), table("rmse_factors")
        if set(scales) != set(rmse):
            raise bad("rmse_factors", "must have the same levels as 'scales'")
        if d.get("unit") not in UNITS:
            raise bad("unit", f"must be one of {', '.join(UNITS)}, got {d.get('unit')!r}")
        counts = {}
        for key in ("n_units", "n_slices"):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, f"must be a positive integer, got {v!r}")
            counts[key] = v
        fg = d.get("foreground")
        if fg is not None:
            fg = number("foreground", fg)
        task = d.get("task", {})
        if not isinstance(task, dict) or not all(
                isinstance(v, str | int | float | bool) or v is None for v in task.values()):
            raise bad("task", "must map names to strings, numbers, booleans or null")
        created = d.get("created", "")
        if not isinstance(created, str):
            raise bad("created", "must be a date string")
        diag = d.get("diagnostics", {})
        if not isinstance(diag, dict):
            raise bad("diagnostics", "must be a mapping")
        return cls(scales=scales, rmse_factors=rmse, floor=number("floor", d.get("floor")),
                   smooth=number("smooth", d.get("smooth", 0.0)),
                   unit=d["unit"], foreground=fg, task=task, created=created,
                   diagnostics=diag, **counts)
