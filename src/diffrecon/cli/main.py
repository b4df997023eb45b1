"""The ``diffrecon`` command: thin typer verbs over the library.

Errors at this edge: an ``InputError`` or a usage error prints ONE line
``diffrecon: error: <message>`` on stderr and exits 2; any other exception prints one line and
exits 1 (the traceback only with ``--debug`` or ``DIFFRECON_DEBUG=1``). Outputs are written
atomically, so a failed command leaves no output file.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x vendors click as typer._click
    from typer._click import exceptions as _cx
    from typer._click.core import ParameterSource
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as _cx
from diffrecon.errors import InputError

PROG = "diffrecon"


def _debug(args) -> bool:
    return os.environ.get("DIFFRECON_DEBUG", "") not in ("", "0") or "--debug" in (args or [])


def _fail(message: str, code: int) -> int:
    line = " ".join(str(message).split())  # exactly one line
    typer.echo(f"{PROG}: error: {line}", err=True)
    return code


class OneLineErrors(TyperGroup):
    """Top-level group: maps every failure to one stderr line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(args=argv, prog_name=prog_name or PROG, complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except _cx.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
            code = 2
        except _cx.UsageError as exc:
            where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
            code = _fail(where + exc.format_message(), 2)
        except _cx.ClickException as exc:
            code = _fail(exc.format_message(), exc.exit_code)
        except typer.Abort:
            code = _fail("aborted", 1)
        except InputError as exc:
            if _debug(argv):
                traceback.print_exc()
            code = _fail(str(exc), 2)
        except KeyboardInterrupt:
            code = _fail("interrupted", 130)
        except Exception as exc:  # noqa: BLE001 - the CLI edge
            if _debug(argv):
                traceback.print_exc()
                code = _fail(f"internal error: {type(exc).__name__}: {exc}", 1)
            else:
                code = _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug "
                             f"for the traceback)", 1)
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Posterior sampling for imaging inverse problems (MRI, CT, deblurring, "
                       "super-resolution) with diffusion priors. Scan and result files are "
                       "HDF5 (fastMRI layout for MRI).")
simulate_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                           help="Write simulated scans with ground truth (MRI, CT, blur, "
                                "super-resolution).")
app.add_typer(simulate_app, name="simulate")


@app.callback()
def _root(debug: Annotated[bool, typer.Option(
        "--debug", help="Show tracebacks for internal errors (also DIFFRECON_DEBUG=1).")] = False):
    """Posterior sampling for imaging inverse problems with diffusion priors."""
    # --debug is read from argv by OneLineErrors (_debug); it must not leak into the
    # environment, where it would outlive this invocation in-process (tests, notebooks).


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _make_parent(path: Path) -> Path:
    """Create the output's directory (mkdir -p), as a user expects of `-o study/scan.h5`."""
    if path is not None and not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise typer.BadParameter(f"cannot create directory {path.parent}: {exc.strerror}",
                                     param_hint="'-o' / '--output'") from None
    return path


def _out_option(help_text: str):
    return typer.Option("-o", "--output", help=help_text + " Missing directories are created.",
                        callback=_make_parent)


# --------------------------------------------------------------------------- simulate

class MaskType(str, Enum):
    random = "random"
    equispaced = "equispaced"
    equispaced_fraction = "equispaced_fraction"
    poisson = "poisson"


class Kernel(str, Enum):
    gaussian = "gaussian"
    motion = "motion"
    uniform = "uniform"


Output = Annotated[Path, _out_option("Scan file to write (HDF5).")]
Size = Annotated[int, typer.Option("--size", help="Image size in pixels (square).", min=8)]
Slices = Annotated[int, typer.Option("--slices", help="Number of slices.", min=1)]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the phantoms, mask and noise.")]


def _done(path: Path) -> None:
    typer.echo(f"wrote {path}")


@simulate_app.command("mri")
def simulate_mri(
    output: Output,
    size: Size = 128, slices: Slices = 2, seed: Seed = 0,
    noise: Annotated[float, typer.Option(
        "--noise", help="k-space noise std per real/imag component, in units where the image "
                        "magnitude peaks at 1.", min=0.0)] = 0.0,
    coils: Annotated[int, typer.Option("--coils", help="Receive coils (1 = single coil).",
                                       min=1)] = 8,
    acceleration: Annotated[float, typer.Option(
        "--acceleration", help="Undersampling factor R (phase-encoding lines kept = 1/R).",
        min=1.0)] = 4.0,
    mask_type: Annotated[MaskType, typer.Option(
        "--mask-type", help="fastMRI 1D mask kind, or 2D variable-density Poisson disc.")
    ] = MaskType.random,
    center_fraction: Annotated[float, typer.Option(
        "--center-fraction", help="Fraction of central (ACS) lines always sampled.",
        min=0.0, max=1.0)] = 0.08,
    fully_sampled: Annotated[bool, typer.Option(
        "--fully-sampled", help="Write full k-space without a mask (train-style); `run` then "
                                "needs --acceleration.")] = False,
    coil_maps: Annotated[bool, typer.Option(
        "--coil-maps", help="Also store the true coil maps as 'coil_maps'.")] = False,
):
    """Simulated fastMRI-layout MRI volume with ground truth (reconstruction_rss and
    ground_truth_complex)."""
    from diffrecon.datasets.simulate import simulate_mri as sim

    _done(sim(output, size=size, slices=slices, coils=coils, acceleration=acceleration,
              center_fraction=center_fraction, mask_type=mask_type.value, noise=noise,
              seed=seed, fully_sampled=fully_sampled, with_coil_maps=coil_maps))


@simulate_app.command("ct")
def simulate_ct(
    output: Output,
    size: Size = 128, slices: Slices = 2, seed: Seed = 0,
    views: Annotated[int, typer.Option("--views", help="Number of projection angles.",
                                       min=1)] = 30,
    angle_range: Annotated[float, typer.Option(
        "--angle-range", help="Angular range covered by the views, in DEGREES (180 = full "
                              "parallel-beam; less = limited angle).", min=1e-3, max=360.0)
    ] = 180.0,
    noise: Annotated[float, typer.Option(
        "--noise", help="Sinogram noise std as a fraction of the largest line integral.",
        min=0.0)] = 0.0,
):
    """Simulated 2D parallel-beam CT scan (sparse-view or limited-angle) with ground truth."""
    import math

    from diffrecon.datasets.simulate import simulate_ct as sim

    _done(sim(output, size=size, slices=slices, views=views,
              angle_range=math.radians(angle_range), noise=noise, seed=seed))


@simulate_app.command("blur")
def simulate_blur(
    output: Output,
    size: Size = 128, slices: Slices = 2, seed: Seed = 0,
    kernel: Annotated[Kernel, typer.Option("--kernel", help="Blur kernel shape.")
                      ] = Kernel.gaussian,
    kernel_width: Annotated[float, typer.Option(
        "--kernel-width", help="Kernel width in pixels (gaussian std, motion length, box "
                               "side).", min=0.0)] = 2.0,
    noise: Annotated[float, typer.Option(
        "--noise", help="Additive Gaussian noise std in image units (images in [0, 1]).",
        min=0.0)] = 0.01,
):
    """Simulated deblurring scan (circular boundary) with ground truth."""
    from diffrecon.datasets.simulate import simulate_image

    _done(simulate_image(output, operator="blur", size=size, slices=slices,
                         kernel=kernel.value, kernel_width=kernel_width, noise=noise, seed=seed))


@simulate_app.command("superres")
def simulate_superres(
    output: Output,
    size: Size = 128, slices: Slices = 2, seed: Seed = 0,
    factor: Annotated[int, typer.Option("--factor", help="Downsampling factor (2 or 4).")
                      ] = 4,
    noise: Annotated[float, typer.Option(
        "--noise", help="Additive Gaussian noise std in image units (images in [0, 1]).",
        min=0.0)] = 0.01,
):
    """Simulated super-resolution scan (antialiased bicubic downsampling) with ground truth."""
    from diffrecon.datasets.simulate import simulate_image

    if factor not in (2, 4):
        raise InputError(f"--factor {factor} is not valid; expected 2 or 4")
    _done(simulate_image(output, operator="superres", size=size, slices=slices, factor=factor,
                         noise=noise, seed=seed))


# --------------------------------------------------------------------------- info / calib

@app.command()
def info(
    file: Annotated[Path, typer.Argument(help="Scan or result file (HDF5).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")
                       ] = False,
):
    """What a scan or result holds: modality, shapes, coils, mask and acceleration, noise
    estimate, or a result's provenance."""
    from diffrecon.pipeline import describe_file

    d = describe_file(file)
    if as_json:
        _print_json(d)
        return
    typer.echo(f"{d['file']}: {d['modality']}")
    for key, value in d.items():
        if key in ("file", "modality", "datasets"):
            continue
        if isinstance(value, dict):
            typer.echo(f"  {key}:")
            for k, v in value.items():
                typer.echo(f"    {k}: {v}")
        else:
            typer.echo(f"  {key}: {value}")
    typer.echo("  datasets:")
    for name, ds in d["datasets"].items():
        typer.echo(f"    {name}: {tuple(ds['shape'])} {ds['dtype']}")


@app.command()
def calib(
    scan: Annotated[Path, typer.Argument(help="Multi-coil MRI scan (fastMRI layout).")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Side file for the maps (default: add 'coil_maps' to the scan "
                               "itself, rewritten atomically).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing maps.")
                         ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
):
    """ESPIRiT coil sensitivity maps (sigpy) from the central fully sampled k-space lines
    (calibration width min(24, ACS lines), kernel 6)."""
    from diffrecon.pipeline import calibrate_file

    s = calibrate_file(scan, output, overwrite=overwrite)
    _print_json(s) if as_json else typer.echo(f"wrote coil maps {tuple(s['shape'])} to "
                                              f"{s['coil_maps']}")


# --------------------------------------------------------------------------- run

RUN_KEYS = {  # config key -> (type, CLI flag)
    "solver": (str, "--solver"), "prior": (str, "--prior"), "steps": (int, "--steps"),
    "samples": (int, "--samples"), "seed": (int, "--seed"), "device": (str, "--device"),
    "slices": (str, "--slices"), "batch_size": (int, "--batch-size"),
    "acceleration": (float, "--acceleration"), "mask_type": (str, "--mask-type"),
    "center_fraction": (float, "--center-fraction"), "coil_maps": (str, "--coil-maps"),
    "save_samples": (bool, "--save-samples"), "overwrite": (bool, "--overwrite"),
    "solver_options": (dict, "--option"),
}


def load_config(path: Path) -> dict[str, Any]:
    """YAML config whose keys mirror ``run``'s options (underscores or dashes), plus
    ``solver_options`` (a mapping of solver option overrides)."""
    import yaml

    if not path.is_file():
        raise InputError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})"
                         ) from exc
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of option names to values")
    out = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in RUN_KEYS:
            raise InputError(f"--config {path}: unknown key {key!r}; valid: "
                             f"{', '.join(sorted(RUN_KEYS))}")
        typ = RUN_KEYS[k][0]
        if value is not None:
            ok = (isinstance(value, typ) and not (typ is int and isinstance(value, bool))) or (
                typ is float and isinstance(value, int) and not isinstance(value, bool)) or (
                typ is str and k == "slices" and isinstance(value, int | list))
            if not ok:
                raise InputError(f"--config {path}: key {key!r} is {value!r}, expected "
                                 f"{typ.__name__}")
        out[k] = value
    return out


def _parse_option(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise InputError(f"--option {text!r} is not valid; expected NAME=VALUE")
    name, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return name.strip().replace("-", "_"), value


@app.command()
def run(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(
        help="Scan files and/or directories of .h5 scans.", show_default=False)],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Result file for one input; a directory (created) for several "
                               "inputs or a directory input (results <stem>_recon.h5).")],
    solver: Annotated[str | None, typer.Option(
        "--solver", help="Solver: dds, dps, reddiff, smc (diffusion) or zero-filled, "
                         "cg-sense, fbp, l1-wavelet, tv (classical). Default: dds when the "
                         "modality's shipped prior is installed, else tv.",
                         show_default=False)] = None,
    prior: Annotated[str | None, typer.Option(
        "--prior", help="Prior name (see diffrecon.priors.available()) or a local .pt "
                        "checkpoint. Default: phantom-mri for MRI, phantom-ct for CT and "
                        "images. Ignored by classical solvers.", show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Diffusion / iteration steps (default: the solver's own).",
        show_default=False)] = None,
    samples: Annotated[int, typer.Option("--samples", help="Posterior samples per slice "
                                         "(>1 gives a meaningful std map).")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Base seed; slice k uses (seed, k).")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:INDEX.")
                      ] = "auto",
    slices: Annotated[str | None, typer.Option(
        "--slices", help="Slices to reconstruct, e.g. '0,2,5-7' (default: all).",
        show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Posterior samples / particles per pass (memory bound; halved "
                             "automatically on CUDA out-of-memory). Default: solver's.",
        show_default=False)] = None,
    acceleration: Annotated[float | None, typer.Option(
        "--acceleration", help="Retrospective undersampling factor for FULLY SAMPLED MRI "
                               "files (mask seeded from the file name as fastMRI does).",
        show_default=False)] = None,
    mask_type: Annotated[str | None, typer.Option(
        "--mask-type", help="Retrospective mask: random, equispaced or equispaced_fraction "
                            "(default random).", show_default=False)] = None,
    center_fraction: Annotated[float, typer.Option(
        "--center-fraction", help="Fraction of central lines kept by the retrospective "
                                  "mask.")] = 0.08,
    coil_maps: Annotated[Path | None, typer.Option(
        "--coil-maps", help="Side file with 'coil_maps' (from `diffrecon calib -o`). Default: "
                            "the scan's maps, else ESPIRiT.", show_default=False)] = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", help="Solver option override NAME=VALUE (repeatable), e.g. "
                         "--option eta=0.85.", show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="YAML file whose keys mirror these options (e.g. solver: tv, "
                         "batch_size: 4, solver_options: {...}); command-line flags win.",
        show_default=False)] = None,
    save_samples: Annotated[bool, typer.Option("--save-samples", help="Store the posterior "
                                               "samples in the result.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo inputs whose result "
                                            "exists (default: skip them).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary (rank 0).")
                       ] = False,
):
    """Reconstruct scan files (MRI k-space, CT sinograms, blurred / low-resolution images).

    Resumable: each result is written to a temporary name and renamed when complete; a
    rerun skips inputs whose complete result exists. Under `torchrun --nproc-per-node=G
    diffrecon run ...` files (or a single file's slices) are sharded across processes.
    """
    from diffrecon.cli.progress import TqdmProgress
    from diffrecon.pipeline import collect_inputs, reconstruct_many

    given = {name: ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
             for name in RUN_KEYS}
    values = {"solver": solver, "prior": prior, "steps": steps, "samples": samples,
              "seed": seed, "device": device, "slices": slices, "batch_size": batch_size,
              "acceleration": acceleration, "mask_type": mask_type,
              "center_fraction": center_fraction, "coil_maps": coil_maps,
              "save_samples": save_samples, "overwrite": overwrite, "solver_options": {}}
    for text in option or []:
        k, v = _parse_option(text)
        values["solver_options"][k] = v
    if config is not None:
        for k, v in load_config(config).items():
            if k == "solver_options":
                values[k] = {**(v or {}), **values[k]}  # --option wins over the config
            elif not given.get(k) and not (isinstance(v, bool) and values[k] is True):
                values[k] = v
    if isinstance(values["slices"], list):
        values["slices"] = ",".join(map(str, values["slices"]))
    rank = int(os.environ.get("RANK", "0"))
    progress = TqdmProgress(len(collect_inputs(inputs)), quiet=quiet or rank != 0)
    try:
        summaries = reconstruct_many(inputs, output, progress=progress, **values)
    finally:
        progress.close()
    if rank != 0:
        return
    if as_json:
        _print_json(summaries)
        return
    for s in summaries:
        if s["status"] == "skipped":
            typer.echo(f"skipped {s['input']}: complete result {s['output']} exists "
                       f"(--overwrite to redo)")
        else:
            typer.echo(f"{s['input']} -> {s['output']}  [{s['solver']}, {s['slices']} slices, "
                       f"NFE {s['nfe']}, {s['wall_time_s']:.1f} s, {s['device']}]")
        for line in s.get("warnings", []):
            typer.echo(f"{PROG}: warning: {line}", err=True)


# --------------------------------------------------------------------------- evaluate / view

class ReferenceKind(str, Enum):
    auto = "auto"
    rss = "rss"
    complex = "complex"


RefKind = Annotated[ReferenceKind, typer.Option(
    "--reference-kind", help="MRI ground truth: rss (reconstruction_rss, the fastMRI "
                             "target), complex (|ground_truth_complex|, MVUE-like) or auto "
                             "(rss when present).")]


@app.command()
def evaluate(
    result: Annotated[Path, typer.Argument(help="Result file written by `diffrecon run`.")],
    reference: Annotated[Path, typer.Option("--reference", help="Scan file holding the "
                                            "ground truth.")],
    reference_kind: RefKind = ReferenceKind.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: psnr, ssim, nmse "
                                          "(means over slices), per_slice, volume.")] = False,
):
    """PSNR (dB), SSIM and NMSE as fastMRI computes them (data range = max of the reference
    VOLUME), per slice and their mean; `volume` holds fastMRI's volume-level figures."""
    from diffrecon.metrics import evaluate_file

    m = evaluate_file(result, reference, reference_kind.value)
    if as_json:
        _print_json(m)
        return
    typer.echo(f"{result} vs {reference} ({m['reference']}): PSNR {m['psnr']:.2f} dB  "
               f"SSIM {m['ssim']:.4f}  NMSE {m['nmse']:.4g}")
    for s in m["per_slice"]:
        typer.echo(f"  slice {s['slice']}: PSNR {s['psnr']:.2f} dB  SSIM {s['ssim']:.4f}  "
                   f"NMSE {s['nmse']:.4g}")


@app.command()
def view(
    result: Annotated[Path, typer.Argument(help="Result file written by `diffrecon run`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write.")],
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="Scan with ground truth: adds the |error| map and metrics.",
        show_default=False)] = None,
    reference_kind: RefKind = ReferenceKind.auto,
    slice_: Annotated[list[int] | None, typer.Option(
        "--slice", help="Result slice(s) to show (index into the result; default: middle).",
        show_default=False)] = None,
):
    """Figure: reconstruction, |error| and posterior std maps side by side with colour bars
    and the metrics in the title."""
    from diffrecon.figures import save_figure

    try:
        path = save_figure(result, output, reference=reference, slices=slice_,
                           reference_kind=reference_kind.value)
    except ValueError as exc:
        raise InputError(f"{result}: {exc}") from exc
    typer.echo(f"wrote {path}")


# --------------------------------------------------------------------------- demo / train / bench

@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", help="Where to put the scan, "
                                             "result and figure.")] = Path("diffrecon-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Tiny and fast (48 px, 1 slice, "
                                        "10 diffusion steps).")] = False,
    solver: Annotated[str | None, typer.Option(
        "--solver", help="Solver (default: dds with the shipped prior, or tv when no "
                         "prior is installed).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
):
    """Simulate a small 4x 8-coil MRI scan (64 px, 2 slices), reconstruct it with the default
    solver (ESPIRiT coil maps), evaluate and plot it; print where everything went."""
    from diffrecon import pipeline
    from diffrecon.cli.progress import TqdmProgress
    from diffrecon.datasets.simulate import simulate_mri as sim
    from diffrecon.figures import save_figure
    from diffrecon.metrics import evaluate_file

    output_dir.mkdir(parents=True, exist_ok=True)
    scan = output_dir / "scan.h5"
    size, n_slices = (48, 1) if quick else (64, 2)
    # centre fraction 0.16: >= 8 calibration lines at these small sizes, enough for ESPIRiT
    sim(scan, size=size, slices=n_slices, coils=8, acceleration=4, center_fraction=0.16,
        noise=0.002, seed=0)
    chosen = solver or pipeline.default_solver("mri")
    steps = (10 if quick else None) if chosen in ("dds", "dps", "reddiff", "smc") else None
    result = output_dir / f"scan_{chosen}.h5"
    progress = TqdmProgress(1, quiet=quiet)
    try:
        pipeline.reconstruct_file(scan, result, solver=chosen, steps=steps, overwrite=True,
                                  samples=1 if quick else 4, progress=progress)
    finally:
        progress.close()
    metrics = evaluate_file(result, scan)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    figure = save_figure(result, output_dir / f"scan_{chosen}.png", reference=scan)
    typer.echo(f"scan:           {scan}")
    typer.echo(f"reconstruction: {result}  (solver {chosen})")
    typer.echo(f"metrics:        {output_dir / 'metrics.json'}  PSNR {metrics['psnr']:.2f} dB "
               f"SSIM {metrics['ssim']:.4f}")
    typer.echo(f"figure:         {figure}")


@app.command("train-prior")
def train_prior_cmd(
    output_dir: Annotated[Path, typer.Option("-o", "--output-dir", help="Directory for "
                                             "checkpoint.pt and the exported prior.pt.")],
    family: Annotated[list[str], typer.Option(
        "--family", help="'ellipses' (1 channel, [0, 1]), 'mri' (2 channels, |x| <= 1) or "
                         "HDF5 file(s) with an 'image' dataset (repeatable).")] = ["ellipses"],  # noqa: B006
    channels: Annotated[int | None, typer.Option(
        "--channels", help="Image channels (default: 2 for mri, else 1).",
        show_default=False)] = None,
    name: Annotated[str | None, typer.Option("--name", help="Prior name (default: the "
                                             "directory name).", show_default=False)] = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps.", min=1)] = 10_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.", min=1)
                          ] = 16,
    crop: Annotated[int, typer.Option("--crop", help="Training crop size in pixels "
                                      "(multiple of 4).")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 2e-4,
    base: Annotated[int, typer.Option("--base", help="U-Net base channel count.")] = 32,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between "
                                                  "checkpoints.")] = 500,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue an existing "
                                         "checkpoint in the output directory.")] = True,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:INDEX.")
                      ] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of data stream and init.")] = 0,
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision (bf16/fp16 autocast; "
                                      "CUDA only, ignored on CPU).")] = False,
    report: Annotated[int, typer.Option("--report", help="Held-out 'val' phantoms for the "
                                        "final denoising report (PSNR vs sigma; phantom "
                                        "families only; 0 = none).")] = 4,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress log.")] = False,
):
    """Train a U-Net denoiser prior with the EDM loss (thin over
    diffrecon.priors.training.train_prior); resumable. Ends with a denoising report on the
    validation split."""
    from diffrecon.priors.training import denoising_report, report_table, train_prior

    fam: Any = family[0] if len(family) == 1 else family
    ch = channels if channels is not None else (2 if fam == "mri" else 1)

    def log(info):
        if not quiet:
            typer.echo(f"step {info['step']:>7d}  loss {info['loss']:.5f}  lr {info['lr']:.2e}",
                       err=True)

    prior = train_prior(output_dir, family=fam, channels=ch, name=name, crop=crop,
                        batch_size=batch_size, steps=steps, lr=lr, base=base,
                        checkpoint_every=checkpoint_every, resume=resume, device=device,
                        seed=seed, amp=amp, callback=log)
    typer.echo(f"wrote {output_dir / 'prior.pt'} (sha256 {prior.checksum})")
    if report > 0 and fam in ("ellipses", "mri"):
        size = max(crop, 64)
        table = report_table(denoising_report(prior, fam, n=report, size=size, split="val",
                                              baseline=False))
        typer.echo(f"denoising PSNR on {report} held-out 'val' {fam} phantoms ({size} px):")
        typer.echo(table)


def _benchmarks_dir() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "benchmarks").is_dir() and (parent / "pyproject.toml").is_file():
            return parent / "benchmarks"
    return Path.cwd() / "benchmarks"


@app.command()
def bench(
    names: Annotated[list[str] | None, typer.Argument(
        help="Benchmark scripts to run (file stems); default: all.", show_default=False)
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Pass --quick to each script.")
                     ] = False,
    list_only: Annotated[bool, typer.Option("--list", help="Only list the benchmarks.")
                         ] = False,
):
    """Run the reproducible benchmark scripts in benchmarks/*.py (a source checkout)."""
    import subprocess

    folder = _benchmarks_dir()
    scripts = sorted(p for p in folder.glob("*.py")
                     if not p.name.startswith("_") and p.stem != "common")  # common: a module
    if not scripts:
        raise InputError(f"no benchmark scripts found in {folder} (run from a source checkout)")
    if names:
        known = {p.stem: p for p in scripts}
        missing = [n for n in names if n not in known]
        if missing:
            raise InputError(f"unknown benchmark {missing[0]!r}; available: "
                             f"{', '.join(known)}")
        scripts = [known[n] for n in names]
    if list_only:
        for p in scripts:
            typer.echo(p.stem)
        return
    failed = []
    for p in scripts:
        typer.echo(f"== {p.stem}", err=True)
        cmd = [sys.executable, str(p)] + (["--quick"] if quick else [])
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(p.stem)
    if failed:
        raise RuntimeError(f"benchmark(s) failed: {', '.join(failed)}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``diffrecon``).

    Under torchrun (``WORLD_SIZE`` > 1) the process leaves with ``os._exit`` after flushing:
    all results are written and the process group destroyed by then, and skipping C++
    static destructors avoids gloo's occasional "terminate called without an active
    exception" abort at interpreter shutdown (seen about once in 30 two-rank runs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return app(args=argv, prog_name=PROG)
    code = 0
    try:
        app(args=argv, prog_name=PROG)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
