"""``diffrecon run``: reconstruct scan files. Its flags are the fields of
``pipeline.RunOptions`` (``--option NAME=VALUE`` fills ``solver_options``); a ``--config``
YAML file may give any of them, command-line flags win."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer >= 0.2x vendors click as typer._click
    from typer._click.core import ParameterSource
except ImportError:  # pragma: no cover - older typer on top of click
    from click.core import ParameterSource
from diffrecon.cli.app import PROG, app, print_json
from diffrecon.errors import InputError, printable
from diffrecon.pipeline.options import RunOptions

D = RunOptions()  # the defaults
FIELDS = [f.name for f in dataclasses.fields(RunOptions)]


@app.command()
def run(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(
        help="Scan files and/or directories of .h5 scans.", show_default=False)],
    output: Annotated[str, typer.Option(
        "-o", "--output", help="Result file for one input; a directory (created) for several "
                               "inputs, a directory input or a path ending in '/' (results "
                               "<stem>_recon.h5).")],
    solver: Annotated[str | None, typer.Option(
        "--solver", help="Solver: dds, dps, reddiff, smc (diffusion) or zero-filled, "
                         "cg-sense, fbp, l1-wavelet, tv (classical). Default: dds when the "
                         "modality's shipped prior is installed, else tv.",
                         show_default=False)] = D.solver,
    prior: Annotated[str | None, typer.Option(
        "--prior", help="Prior name (see diffrecon.priors.available()) or a local checkpoint "
                        "as its repository released it (guided-diffusion/DPS/RED-diff/DDS, "
                        "score-SDE/score-MRI, EDM, diffusers folder, deepinv, diffrecon). "
                        "Default: mri for MRI, ct for CT, natural for images. "
                        "Ignored by classical solvers.", show_default=False)] = D.prior,
    prior_kind: Annotated[str | None, typer.Option(
        "--prior-kind", help="Checkpoint kind when the file cannot tell: adm, vpred, "
                             "score_sde, ncsnpp, edm, diffusers, deepinv, diffrecon "
                             "(default: read off the file).", show_default=False)
                          ] = D.prior_kind,
    prior_config: Annotated[list[Path] | None, typer.Option(
        "--prior-config", help="The checkpoint repository's own config file (yaml, json or "
                               "ml_collections .py, as released; read, never executed) for "
                               "what the file cannot tell. Repeatable, later files win.",
                               show_default=False)] = None,
    prior_label: Annotated[int | None, typer.Option(
        "--prior-label", help="Class index for a class-conditional prior (required for "
                              "class-conditional ADMs; EDM default: its null label).",
                              show_default=False)] = D.prior_label,
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow a Python-pickle checkpoint (EDM .pkl): unpickling can "
                               "run code from the file, so only for files you trust; "
                               "`diffrecon convert-prior` makes a safe copy once.")
                            ] = D.trust_pickle,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Diffusion / iteration steps (default: 100 for dds, "
                        "pipeline.options.DEFAULT_STEPS; else the solver's own).",
        show_default=False)] = D.steps,
    samples: Annotated[int | None, typer.Option(
        "--samples", help="Posterior samples per slice; the result is their mean, the std map "
                          "their spread (default: 4 for dds, pipeline.options.DEFAULT_SAMPLES; "
                          "else 1; --samples 1 is 4x faster on a CPU).",
        show_default=False)] = D.samples,
    seed: Annotated[int, typer.Option("--seed", help="Base seed; slice k uses (seed, k).")
                    ] = D.seed,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:INDEX.")
                      ] = D.device,
    slices: Annotated[str | None, typer.Option(
        "--slices", help="Slices to reconstruct, e.g. '0,2,5-7' (default: all).",
        show_default=False)] = D.slices,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Slices of one volume solved together (DDS: the network sees "
                             "N slices at once; results agree to float rounding, not bits). "
                             "Default 1 on CPU, 8 on a GPU; halved on CUDA out-of-memory. "
                             "Samples per pass: --option batch_size=N.",
        show_default=False)] = D.batch_size,
    acceleration: Annotated[float | None, typer.Option(
        "--acceleration", help="Retrospective undersampling factor for FULLY SAMPLED MRI "
                               "files (mask seeded from the file name as fastMRI does).",
        show_default=False)] = D.acceleration,
    mask_type: Annotated[str | None, typer.Option(
        "--mask-type", help="Retrospective mask: random, equispaced or equispaced_fraction "
                            "(default random).", show_default=False)] = D.mask_type,
    center_fraction: Annotated[float, typer.Option(
        "--center-fraction", help="Fraction of central lines kept by the retrospective "
                                  "mask.")] = D.center_fraction,
    coil_maps: Annotated[Path | None, typer.Option(
        "--coil-maps", help="Side file with 'coil_maps' (from `diffrecon calib -o`). Default: "
                            "the scan's maps, else ESPIRiT.", show_default=False)] = D.coil_maps,
    coil_compression: Annotated[str, typer.Option(
        "--coil-compression", help="MRI coil compression (SVD): auto (scans with more than 8 "
                                   "coils: >= 8 virtual coils keeping 99.9% of the k-space "
                                   "energy), off, or a number of virtual coils.")
                                ] = str(D.coil_compression),
    option: Annotated[list[str] | None, typer.Option(
        "--option", help="Solver option override NAME=VALUE (repeatable), e.g. "
                         "--option eta=0.85.", show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="YAML file whose keys mirror these options (e.g. solver: tv, "
                         "batch_size: 4, solver_options: {...}); command-line flags win.",
        show_default=False)] = None,
    save_samples: Annotated[bool, typer.Option("--save-samples", help="Store the posterior "
                                               "samples in the result.")] = D.save_samples,
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", help="Calibration file from `diffrecon calibrate` for this task "
                              "(solver, options, prior, samples, acceleration / views; a "
                              "mismatch is refused before any work): the result also holds "
                              "calibrated intervals lower_<level> / upper_<level>.",
        show_default=False)] = D.calibration,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo inputs whose result "
                                            "exists (default: skip them).")] = D.overwrite,
    precision: Annotated[str, typer.Option(
        "--precision", help="Network prior precision: fp32, bf16 (bf16 autocast: about "
                            "1.6x faster on CUDA and on CPUs with AVX512-BF16 or AMX, PSNR "
                            "within 0.02 dB in RESULTS.md) or auto (bf16 where the device "
                            "has it natively; the result records the one used).")
                          ] = D.precision,
    threads: Annotated[int, typer.Option(
        "--threads", help="Torch and BLAS threads per process, the same in one process and "
                          "under torchrun whatever OMP_NUM_THREADS says (results depend on it "
                          "in the last bits; recorded as the result's 'threads').")
                       ] = D.threads,
    rank_timeout: Annotated[float, typer.Option(
        "--rank-timeout", help="Under torchrun: seconds without a heartbeat after which a "
                               "rank is taken as dead and the others stop.")
                            ] = D.rank_timeout,
    spread: Annotated[str, typer.Option(
        "--spread", help="Under torchrun, what the ranks share: slices (whole files, or one "
                         "file's slices) or particles (--solver smc: every rank takes part in "
                         "each solve with num_particles / ranks of the particles, a multiple "
                         "of the chunk_size option; the same bits as one process).")
                      ] = D.spread,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary (rank 0).")
                       ] = False,
):
    """Reconstruct scan files (MRI k-space, CT sinograms, blurred / low-resolution images).

    Resumable: each result is written to a temporary name and renamed when complete; a
    rerun skips inputs whose complete result exists. Under `torchrun --nproc-per-node=G
    diffrecon run ...` files (or a single file's slices) are sharded across processes;
    with `--solver smc --spread particles` each SMC cloud's particles are.
    """
    from diffrecon.cli.progress import TqdmProgress
    from diffrecon.pipeline import collect_inputs, reconstruct_many

    opts = RunOptions(**run_values(ctx, option or [], config))
    rank = int(os.environ.get("RANK", "0"))
    progress = TqdmProgress(len(collect_inputs(inputs)), quiet=quiet or rank != 0)
    try:
        summaries = reconstruct_many(inputs, output, opts, progress=progress)
    finally:
        progress.close()
    if rank != 0:
        return
    if as_json:
        print_json(summaries)
        return
    for s in summaries:  # file names printed escaped (errors.printable): one line each
        src, dst = printable(s["input"]), printable(s["output"])
        if s["status"] == "skipped":
            typer.echo(f"skipped {src}: complete result {dst} exists (--overwrite to redo)")
        else:
            typer.echo(f"{src} -> {dst}  [{s['solver']}, {s['slices']} slices, "
                       f"NFE {s['nfe']}, {s['wall_time_s']:.1f} s, {s['device']}]")
        for line in s.get("warnings", []):
            typer.echo(f"{PROG}: warning: {printable(line)}", err=True)


def run_values(ctx: typer.Context, options: list[str], config: Path | None) -> dict[str, Any]:
    """The RunOptions fields from the command line (a flag per field), the ``--option``
    pairs and a ``--config`` file: a flag given on the command line wins over the file, an
    ``--option`` over the file's ``solver_options``."""
    values = {k: v for k, v in ctx.params.items() if k in FIELDS}
    values["solver_options"] = dict(parse_option(text) for text in options)
    if config is not None:
        for k, v in load_config(config).items():
            given = ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)
            if k == "solver_options":
                values[k] = {**(v or {}), **values[k]}
            elif not given and not (isinstance(v, bool) and values[k] is True):
                values[k] = v
    return values


def config_types() -> dict[str, tuple[type, ...]]:
    """The plain types a config file may give each RunOptions field (from its annotation;
    a path is given as a string)."""
    out = {}
    for name, hint in typing.get_type_hints(RunOptions).items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = [typing.get_origin(t) or t for t in (typing.get_args(hint) if union else (hint,))]
        out[name] = tuple(dict.fromkeys(str if t is Path else t for t in kinds
                                        if t in (str, int, float, bool, dict, list, Path)))
    return out


def load_config(path: Path) -> dict[str, Any]:
    """YAML config whose keys are RunOptions fields (underscores or dashes), each checked
    against the field's type."""
    import yaml

    from diffrecon.datasets.safe_open import check_readable_file

    try:
        check_readable_file(path, "a YAML file")
    except InputError as exc:
        raise InputError(f"--config {exc}") from None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})"
                         ) from exc
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of option names to values")
    types, out = config_types(), {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in types:
            raise InputError(f"--config {path}: unknown key {key!r}; valid: "
                             f"{', '.join(sorted(types))}")
        ok = value is None or any(
            isinstance(value, t) and (t is bool or not isinstance(value, bool))
            for t in types[k] + ((int,) if float in types[k] else ()))
        if not ok:
            raise InputError(f"--config {path}: key {key!r} is {value!r}, expected "
                             f"{' or '.join(t.__name__ for t in types[k])}")
        out[k] = value
    return out


def parse_option(text: str) -> tuple[str, Any]:
    """'NAME=VALUE' (VALUE as YAML: numbers, booleans, null) -> (name, value)."""
    import yaml

    if "=" not in text:
        raise InputError(f"--option {text!r} is not valid; expected NAME=VALUE")
    name, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return name.strip().replace("-", "_"), value
