"""``RunOptions``: everything ``diffrecon run`` can be told, in one place, and the factories
that turn them into a device, a solver and a prior.

The command line's flags are these fields (``--option NAME=VALUE`` fills
``solver_options``), a YAML ``--config`` file's keys too, and the pipeline reads them from
here: a run option is named where it is declared on the command line and here, nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffrecon.errors import InputError
from diffrecon.priors.base import Prior
from diffrecon.problems import parse_slices

DEFAULT_SOLVER = "dds"
DEFAULT_PRIORS = {"mri": "mri", "ct": "ct", "image": "natural"}
BASELINE_SOLVERS = {"mri": "tv", "ct": "tv", "image": "tv"}  # best classical on the phantoms

RESULT = "result"  # field metadata: False for options that do not change the result


@dataclass(frozen=True)
class RunOptions:
    """Options of a reconstruction run (validated at construction; ``InputError`` names
    the flag).

    solver, solver_options, steps: solver name (``diffrecon.recon.SOLVERS``; default
    :func:`default_solver`), option overrides (its ``Options`` fields), diffusion steps.
    prior: prior name, checkpoint path or ``Prior`` instance; default by modality
    (``DEFAULT_PRIORS``); not loaded for the classical baselines.
    prior_kind, prior_config, prior_label, trust_pickle: how a checkpoint file is read
    (``diffrecon.priors.load``'s kind, config file(s), class label, pickle consent).
    samples: posterior samples per slice; seed: slice k uses seed material (seed, k).
    device: 'auto', 'cpu', 'cuda' or 'cuda:i'.
    slices: slice indices (list or '0,2,5-7'; None = all), kept as a sorted list.
    batch_size: posterior samples / particles per pass (halved on CUDA out-of-memory).
    acceleration, mask_type, center_fraction: retrospective fastMRI undersampling of a fully
    sampled MRI file (required for those, refused for undersampled ones).
    coil_maps: optional side file with ``coil_maps`` (default: the scan's, else ESPIRiT).
    coil_compression: 'auto' (SVD to >= 8 virtual coils for scans with more than 8), 'off'
    or a virtual coil count (``problems.mri.compression_spec``).
    save_samples: also store the posterior draws (slices, samples, ...).
    calibration: a calibration file (``diffrecon calibrate``): the result also holds the
    calibrated intervals ``lower_<level>`` / ``upper_<level>`` (``pipeline.calibrate``).
    overwrite: redo an input whose complete result exists (default: skip it).
    """

    solver: str | None = None
    prior: str | Prior | None = None
    prior_kind: str | None = field(default=None, metadata={RESULT: False})  # prior_load()
    prior_config: str | Path | list[str] | None = field(default=None, metadata={RESULT: False})
    prior_label: int | None = field(default=None, metadata={RESULT: False})
    trust_pickle: bool = field(default=False, metadata={RESULT: False})
    steps: int | None = field(default=None, metadata={RESULT: False})  # in solver_options
    samples: int = 1
    seed: int = 0
    device: str = field(default="auto", metadata={RESULT: False})
    slices: str | int | list[int] | None = None
    batch_size: int | None = field(default=None, metadata={RESULT: False})  # memory knob
    acceleration: float | None = None
    mask_type: str | None = None
    center_fraction: float = 0.08
    coil_maps: str | Path | None = None
    coil_compression: str | int = "auto"
    solver_options: dict[str, Any] = field(default_factory=dict)
    save_samples: bool = False
    calibration: str | Path | None = None
    overwrite: bool = field(default=False, metadata={RESULT: False})

    def __post_init__(self):
        s = self.samples
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise InputError(f"--samples {s!r} is not valid; expected an integer >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size} is not valid; expected an "
                             f"integer >= 1")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps {self.steps} is not valid; expected an integer >= 1")
        if self.coil_maps is not None and not Path(self.coil_maps).is_file():
            raise InputError(f"--coil-maps {self.coil_maps}: no such file")
        from diffrecon.problems.mri import compression_spec

        compression_spec(self.coil_compression)  # the spelling; the count per scan
        resolve_device(self.device)
        object.__setattr__(self, "slices", parse_slices(self.slices))

    @classmethod
    def of(cls, options: RunOptions | None = None, **overrides) -> RunOptions:
        """``options`` (default: the defaults) with keyword overrides."""
        base = options if options is not None else cls()
        return dataclasses.replace(base, **overrides) if overrides else base

    def prior_load(self) -> dict[str, Any]:
        """How to read the prior checkpoint, as ``diffrecon.priors.load`` takes it."""
        config = self.prior_config
        if isinstance(config, list | tuple):
            config = [str(c) for c in config] or None
        return {"kind": self.prior_kind, "config": config, "label": self.prior_label,
                "trust_pickle": bool(self.trust_pickle)}

    def acquisition(self) -> dict[str, Any]:
        """The MRI acquisition options, as ``problems.load_problem`` takes them."""
        return {"acceleration": self.acceleration, "mask_type": self.mask_type,
                "center_fraction": self.center_fraction, "coil_maps": self.coil_maps,
                "coil_compression": self.coil_compression}


def result_fields() -> list[str]:
    """The RunOptions fields that change a result (the resume fingerprint's)."""
    return [f.name for f in dataclasses.fields(RunOptions) if f.metadata.get(RESULT, True)]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda (this process's LOCAL_RANK under torchrun) if available, else cpu."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {device!r} is not valid; expected auto, cpu, cuda or "
                         f"cuda:INDEX") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {device!r} is not valid; expected auto, cpu, cuda or "
                         f"cuda:INDEX")
    return dev


def default_solver(modality: str) -> str:
    """DEFAULT_SOLVER when the modality's shipped prior is installed, else the best classical
    baseline on the simulated phantoms (TV for every modality)."""
    from diffrecon import priors
    from diffrecon.recon import SOLVERS

    with contextlib.suppress(Exception):
        if DEFAULT_PRIORS[modality] in priors.available() and DEFAULT_SOLVER in SOLVERS:
            return DEFAULT_SOLVER
    return BASELINE_SOLVERS[modality]


def make_solver(name: str, options: RunOptions):
    """Solver ``name`` with ``options.solver_options``, ``steps`` and ``batch_size``; an
    unknown name, an option it does not have or an invalid value raise ``InputError``."""
    from diffrecon.recon import SOLVERS, solver_class

    if name not in SOLVERS:
        raise InputError(f"--solver {name!r} is unknown; valid: {', '.join(SOLVERS)}")
    try:
        cls = solver_class(name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"--solver {name!r} is not available in this installation "
                         f"({exc})") from exc
    opts = dict(options.solver_options)
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    if options.steps is not None:
        if "steps" not in fields:
            raise InputError(f"--steps does not apply to solver {name!r} "
                             f"(options: {', '.join(sorted(fields))})")
        opts["steps"] = int(options.steps)
    if options.batch_size is not None and "batch_size" in fields:
        opts["batch_size"] = int(options.batch_size)
    try:
        return cls(**opts)
    except (TypeError, ValueError) as exc:
        raise InputError(f"solver {name!r} options {opts}: {exc}") from exc


def solver_option_dict(solver) -> dict[str, Any]:
    """A solver's options as JSON-able values."""
    return {k: (v if isinstance(v, int | float | str | bool | type(None)) else str(v))
            for k, v in dataclasses.asdict(solver.options).items()}


def load_prior(name, device: torch.device, kind: str | None = None, config=None,
               label: int | None = None, trust_pickle: bool = False):
    """``diffrecon.priors.load`` (a shipped name, or a checkpoint whose kind is read off the
    file; ``RunOptions.prior_load()`` gives the rest) with errors naming ``--prior``; a
    ``Prior`` instance is used as it is."""
    from diffrecon import priors

    if isinstance(name, Prior):
        return name.to(device).eval()
    try:
        prior = priors.load(name, kind, config, trust_pickle=trust_pickle, label=label)
    except InputError as exc:
        raise InputError(f"--prior {name!r}: {exc}") from exc
    except (KeyError, ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        avail = ""
        with contextlib.suppress(Exception):
            avail = f"; available: {', '.join(priors.available())}"
        raise InputError(f"--prior {name!r} cannot be loaded ({exc}){avail}") from exc
    return prior.to(device).eval()
