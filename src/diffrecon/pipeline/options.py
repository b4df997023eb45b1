"""``RunOptions``: everything ``diffrecon run`` can be told, in one place, and the factories
that turn them into a device, a solver and a prior.

The command line's flags are these fields (``--option NAME=VALUE`` fills
``solver_options``), a YAML ``--config`` file's keys too, and the pipeline reads them from
here: a run option is named where it is declared on the command line and here, nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
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
# Steps of a run that gives no --steps (the solvers' own defaults follow their papers). DDS:
# 100, not the paper's 50, for the CPU-sized shipped priors: on the held-out phantom family
# (RESULTS.md section 2) DDS 100 is at least as good as DDS 50 on all 9 tasks (+0 to +2.1 dB)
# at twice the time.
DEFAULT_STEPS = {"dds": 100}
# Posterior draws of a run that gives no --samples (other solvers: 1). The result is their
# mean, the std map their spread. DDS: 4 draws of 100 steps. The mean of K draws estimates
# the posterior mean, the PSNR-optimal estimate, and its squared error never exceeds the
# draws' average (convexity). Gain over one draw on the VALIDATION split (RESULTS.md 0b3):
# MRI 4x +1.4 dB, 8x +0.7 to +1.2, phantom family +1.1 to +1.8. On a CPU it costs 4x the
# time (a 640 x 320 fastMRI-style slice: about 2 min with 2 threads, where one draw meets
# the 60 s target and is 0.2 dB lower); on a GPU the draws run as one batch.
DEFAULT_SAMPLES = {"dds": 4}
# Intra-op threads per process when --threads is not given: a constant, not the core count
# or OMP_NUM_THREADS (torchrun sets 1 per rank), so that a single process and every torchrun
# rank reduce in the same order and give the same bits on any machine. One thread: torchrun
# (one rank per core) is the parallel mode, and on a loaded or small CPU more threads per
# process are slower (RESULTS.md, issue 18); raise it for one large scan on an idle machine.
DEFAULT_THREADS = 1

RESULT = "result"  # field metadata: False for options that do not change the result


@dataclass(frozen=True)
class RunOptions:
    """Options of a reconstruction run (validated at construction, the named solver's
    options included, before any file is read; ``InputError`` names the flag).

    solver, solver_options, steps: solver name (``diffrecon.recon.SOLVERS``; default
    :func:`default_solver`), option overrides (its ``Options`` fields), diffusion steps.
    prior: prior name, checkpoint path or ``Prior`` instance; default by modality
    (``DEFAULT_PRIORS``); not loaded for the classical baselines.
    prior_kind, prior_config, prior_label, trust_pickle: how a checkpoint file is read
    (``diffrecon.priors.load``'s kind, config file(s), class label, pickle consent).
    samples: posterior samples per slice (None: the solver's ``DEFAULT_SAMPLES``, else 1;
    resolved by ``pipeline.run.plan_run``); seed: slice k uses seed material (seed, k).
    device: 'auto', 'cpu', 'cuda' or 'cuda:i'.
    precision: 'fp32', 'bf16' (the network prior under bf16 autocast: about 1.7x faster on
    a CPU with AVX512-BF16 or AMX and on CUDA, results within about 0.01 dB) or 'auto' (bf16
    where the device has native bf16 and the prior a network, else fp32;
    :func:`set_precision`; the result records the one used).
    slices: slice indices (list or '0,2,5-7'; None = all), kept as a sorted list.
    batch_size: slices of one volume solved together (the network sees (N, C, H, W); solvers
    with ``row_noise``, DDS; default 1 on the CPU, ``run.CUDA_SLICE_BATCH`` on a GPU; halved
    on CUDA out-of-memory). Results agree across batch sizes to float rounding, not bits
    (``pipeline.run``). The solver's ``batch_size`` option (``--option batch_size=``) is
    the posterior samples / particles per pass of one slice.
    acceleration, mask_type, center_fraction: retrospective fastMRI undersampling of a fully
    sampled MRI file (required for those, refused for undersampled ones).
    coil_maps: optional side file with ``coil_maps`` (default: the scan's, else ESPIRiT).
    coil_compression: 'auto' (SVD to >= 8 virtual coils for scans with more than 8), 'off'
    or a virtual coil count (``problems.mri.compression_spec``).
    save_samples: also store the posterior draws (slices, samples, ...).
    calibration: a calibration file (``diffrecon calibrate``): the result also holds the
    calibrated intervals ``lower_<level>`` / ``upper_<level>`` (``pipeline.calibrate``).
    overwrite: redo an input whose complete result exists (default: skip it).
    threads: torch intra-op and BLAS threads of each process (default ``DEFAULT_THREADS``,
    never read from OMP_NUM_THREADS: CPU reductions depend on the thread count, so a fixed
    number gives the same bits in one process and under torchrun; ``pipeline.concurrency``).
    rank_timeout: under torchrun, seconds without a heartbeat after which a rank is taken as
    dead and the others stop (``peers.Peers``).
    spread: under torchrun, what the ranks share: 'slices' (files round-robin, or one file's
    slices) or 'particles' (smc only: every solve, N / W of each cloud's particles per rank;
    the same bits as one process, ``pipeline.spread``).
    """

    solver: str | None = None
    prior: str | Prior | None = None
    prior_kind: str | None = field(default=None, metadata={RESULT: False})  # prior_load()
    prior_config: str | Path | list[str] | None = field(default=None, metadata={RESULT: False})
    prior_label: int | None = field(default=None, metadata={RESULT: False})
    trust_pickle: bool = field(default=False, metadata={RESULT: False})
    steps: int | None = field(default=None, metadata={RESULT: False})  # in solver_options
    samples: int | None = None
    seed: int = 0
    device: str = field(default="auto", metadata={RESULT: False})
    precision: str = "auto"
    slices: str | int | list[int] | None = None
    batch_size: int | None = field(default=None, metadata={RESULT: False})  # slices per pass
    acceleration: float | None = None
    mask_type: str | None = None
    center_fraction: float = 0.08
    coil_maps: str | Path | None = None
    coil_compression: str | int = "auto"
    solver_options: dict[str, Any] = field(default_factory=dict)
    save_samples: bool = False
    calibration: str | Path | None = None
    overwrite: bool = field(default=False, metadata={RESULT: False})
    threads: int = field(default=DEFAULT_THREADS, metadata={RESULT: False})  # provenance
    rank_timeout: float = field(default=60.0, metadata={RESULT: False})
    spread: str = field(default="slices", metadata={RESULT: False})  # same bits either way

    def __post_init__(self):
        if self.samples is not None:
            _integer("--samples", self.samples, 1)
        _integer("--threads", self.threads, 1, 4096)
        if not _number(self.rank_timeout, 1, math.inf):
            raise InputError(f"--rank-timeout {self.rank_timeout!r} is not valid; expected "
                             f"a finite number of seconds >= 1")
        _integer("--seed", self.seed, 0, SEED_MAX)
        for flag, value, low in (("--batch-size", self.batch_size, 1), ("--steps", self.steps, 1),
                                 ("--prior-label", self.prior_label, 0)):
            if value is not None:
                _integer(flag, value, low)
        for flag, value in (("--save-samples", self.save_samples),
                            ("--overwrite", self.overwrite),
                            ("--trust-pickle", self.trust_pickle)):
            if not isinstance(value, bool):
                raise InputError(f"{flag} {value!r} is not valid; expected true or false")
        if not isinstance(self.solver_options, dict):
            raise InputError(f"--option {self.solver_options!r} is not valid; expected "
                             f"NAME=VALUE pairs")
        for flag, value in (("--solver", self.solver), ("--mask-type", self.mask_type)):
            if value is not None and not isinstance(value, str):
                raise InputError(f"{flag} {value!r} is not valid; expected a name")
        if self.acceleration is not None and not _number(self.acceleration, 1, math.inf):
            raise InputError(f"--acceleration {self.acceleration!r} is not valid; expected "
                             f"a finite number >= 1")
        if not (_number(self.center_fraction, 0, 1) and self.center_fraction > 0):
            raise InputError(f"--center-fraction {self.center_fraction!r} is not valid; "
                             f"expected a fraction in (0, 1]")
        if self.coil_maps is not None:  # a FIFO or device refused unopened, dangling links named
            from diffrecon.datasets.safe_open import check_readable_file

            try:
                check_readable_file(self.coil_maps, "a coil-map file")
            except InputError as exc:
                raise InputError(f"--coil-maps {exc}") from None
        from diffrecon.problems.mri import compression_spec

        compression_spec(self.coil_compression)  # the spelling; the count per scan
        resolve_device(self.device)
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r} is not valid; expected "
                             f"{', '.join(PRECISIONS)}")
        object.__setattr__(self, "slices", parse_slices(self.slices))
        if self.solver is not None:  # its options too, before any file is read
            make_solver(self.solver, self)
        from .spread import check_spread

        check_spread(self, world=1)  # the split over the ranks: reconstruct_many

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


PRECISIONS = ("auto", "fp32", "bf16")
SEED_MAX = 2 ** 63 - 1  # seeds are stored as int64 provenance


def _integer(flag: str, value, low: int, high: float = math.inf) -> None:
    """InputError naming ``flag`` unless ``value`` is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        rng = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise InputError(f"{flag} {value!r} is not valid; expected an integer {rng}")


def _number(value, low: float, high: float) -> bool:
    """Whether ``value`` is a finite real number (not a bool) in [low, high]."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and low <= value <= high)


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
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {device!r} is not valid; expected auto, cpu, cuda or "
                         f"cuda:INDEX")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: Apple MPS is not available on this machine")
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
    """Solver ``name`` with ``options.solver_options`` and ``steps``; an unknown name, an
    option it does not have or an invalid value raise ``InputError``."""
    from diffrecon.recon import SOLVERS, solver_class

    if name not in SOLVERS:
        raise InputError(f"--solver {name!r} is unknown; valid: {', '.join(SOLVERS)}")
    try:
        cls = solver_class(name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"--solver {name!r} is not available in this installation "
                         f"({exc})") from exc
    opts = {str(k): _numeric_text(cls.Options, str(k), v)
            for k, v in options.solver_options.items()}
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    if options.steps is not None:
        if "steps" not in fields:
            raise InputError(f"--steps does not apply to solver {name!r} "
                             f"(options: {', '.join(sorted(fields))})")
        opts["steps"] = int(options.steps)
    elif "steps" not in opts and name in DEFAULT_STEPS:
        opts["steps"] = DEFAULT_STEPS[name]
    try:
        return cls(**opts)
    except (TypeError, ValueError) as exc:
        raise InputError(f"--option: {exc}") from exc


def _numeric_text(options_cls: type, name: str, value):
    """A number written as text (YAML reads ``1e-3`` as a string) as the number, for the
    fields of ``options_cls`` annotated int or float; anything else unchanged."""
    import typing

    hint = typing.get_type_hints(options_cls).get(name)
    if not isinstance(value, str) or hint is None:
        return value
    kinds = set(typing.get_args(hint) or (hint,))
    text = value.strip()
    with contextlib.suppress(ValueError):
        if int in kinds:
            return int(text)
    with contextlib.suppress(ValueError):
        if float in kinds and text.lower() not in ("nan", "inf", "-inf", "infinity"):
            return float(text)
    return value


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
    except Exception as exc:  # a user's file that no reader understands is bad input
        if not Path(name).exists():
            raise
        raise InputError(f"--prior {name}: not a readable checkpoint ({type(exc).__name__}: "
                         f"{exc})") from exc
    return prior.to(device).eval()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 convolutions natively (CUDA with bf16; a CPU with
    oneDNN bf16 support: AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def set_precision(prior: Prior, precision: str, label: str, device: torch.device) -> str:
    """Run every network inside ``prior`` in ``precision`` (``PRECISIONS``; 'auto' resolved
    by :func:`native_bf16` and whether there is a network); returns the precision used.
    InputError naming ``--precision`` when 'bf16' is asked of a prior without a network."""
    from diffrecon.priors.network import NetworkPrior

    nets = [m for m in prior.modules() if isinstance(m, NetworkPrior)]
    if precision == "bf16" and not nets:
        raise InputError(f"--precision bf16: prior {label!r} has no network to run in "
                         f"reduced precision; use fp32")
    if precision == "auto":
        precision = "bf16" if nets and native_bf16(device) else "fp32"
    for net in nets:
        net.autocast = precision == "bf16"
    return precision
