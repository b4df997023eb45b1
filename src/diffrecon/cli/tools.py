"""``diffrecon info``, ``calib``, ``evaluate``, ``view`` and ``bench``: inspect, prepare,
score and plot scans and results, and run the benchmarks."""

from __future__ import annotations

import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from diffrecon.cli.app import app, print_json
from diffrecon.errors import InputError, printable

PriorKind = Annotated[str | None, typer.Option(
    "--prior-kind", help="Checkpoint kind when the file cannot tell (adm, vpred, score_sde, "
                         "ncsnpp, edm, diffusers, deepinv, diffrecon).", show_default=False)]
PriorConfig = Annotated[list[Path] | None, typer.Option(
    "--prior-config", help="The checkpoint repository's own config file(s) (yaml, json, "
                           ".py; read, never executed).", show_default=False)]
PriorLabel = Annotated[int | None, typer.Option(
    "--prior-label", help="Class index of a class-conditional prior.", show_default=False)]
TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow a Python-pickle checkpoint (runs code from the file: only "
                           "files you trust).")]


def _is_prior(path: Path) -> bool:
    """A prior (shipped name, checkpoint file or model folder) rather than an HDF5 file; a
    FIFO, device or socket is neither (``describe_file`` refuses it without opening it)."""
    from diffrecon import priors

    if path.suffix.lower() in (".h5", ".hdf5"):
        return False
    if path.exists() and not (path.is_dir() or path.is_file()):
        return False
    return path.is_dir() or path.exists() or str(path) in priors.available()


@app.command()
def info(
    file: Annotated[Path, typer.Argument(
        help="Scan or result file (HDF5), or a prior: shipped name, checkpoint or model "
             "folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")
                       ] = False,
    prior_kind: PriorKind = None,
    prior_config: PriorConfig = None,
    prior_label: PriorLabel = None,
    trust_pickle: TrustPickle = False,
):
    """What a scan or result holds: modality, shapes, coils, mask and acceleration, noise
    estimate, or a result's provenance; for a prior, what was read off the file: kind,
    architecture, channels, data range and noise range."""
    from diffrecon.problems.info import describe_file

    if _is_prior(file):
        from diffrecon import priors

        d = priors.describe(priors.load(file, prior_kind, prior_config or None,
                                        trust_pickle=trust_pickle, label=prior_label))
        if as_json:
            print_json(d)
            return
        typer.echo(f"{d['name']}: {d['kind']} prior ({d['class']})")
        for key, value in d.items():
            if key not in ("name", "kind", "class"):
                typer.echo(f"  {key}: {value}")
        return
    d = describe_file(file)
    if as_json:
        print_json(d)
        return

    def say(text):  # the file's name, keys and attribute values escaped: one line each
        typer.echo(printable(text))

    say(f"{d['file']}: {d['modality']}")
    for key, value in d.items():
        if key in ("file", "modality", "datasets"):
            continue
        if isinstance(value, dict):
            say(f"  {key}:")
            for k, v in value.items():
                say(f"    {k}: {v}")
        else:
            say(f"  {key}: {value}")
    say("  datasets:")
    for name, ds in d["datasets"].items():
        say(f"    {name}: {tuple(ds['shape'])} {ds['dtype']}")


@app.command("convert-prior")
def convert_prior(
    source: Annotated[Path, typer.Argument(help="Checkpoint as its repository released it.")],
    output: Annotated[Path, typer.Argument(
        help="Output .pt (weights only; a .json card is written beside it).")],
    prior_kind: PriorKind = None,
    prior_config: PriorConfig = None,
    prior_label: PriorLabel = None,
    trust_pickle: TrustPickle = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")
                         ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON.")] = False,
):
    """Turn a published checkpoint (a pickle only with --trust-pickle) into a safe state
    dict (torch.load weights_only) plus a json card; `--prior OUTPUT` then loads it with no
    other option."""
    import json

    from diffrecon import priors

    if output.suffix != ".pt":
        raise InputError(f"convert-prior output {output}: expected a .pt file name")
    if output.exists() and not overwrite:
        raise InputError(f"convert-prior output {output} exists (--overwrite to replace it)")
    if output.resolve() == source.resolve():
        raise InputError(f"convert-prior output {output} is the input")
    dst = priors.convert(source, output, prior_kind, prior_config or None,
                         trust_pickle=trust_pickle, label=prior_label)
    card = json.loads(dst.with_suffix(".json").read_text())
    if as_json:
        print_json(card)
        return
    typer.echo(f"wrote {dst} and {dst.with_suffix('.json')}: {card['kind']} prior, "
               f"{card['channels']} channel(s), data range {card['data_range']}, sigma "
               f"{card['sigma_min']:.4g}-{card['sigma_max']:.4g}")


@app.command()
def calib(
    scan: Annotated[Path, typer.Argument(help="Multi-coil MRI scan (fastMRI layout).")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Side file for the maps (default: add 'coil_maps' to the scan "
                               "itself, rewritten atomically).")] = None,
    slices: Annotated[str | None, typer.Option(
        "--slices", help="Only these slices, e.g. '0,2,5-7' (needs -o: a partial side file "
                         "that also records the slice numbers).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing maps.")
                         ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
):
    """ESPIRiT coil sensitivity maps (sigpy) from the central fully sampled k-space lines
    (calibration width min(24, ACS lines), kernel up to 6), computed on a coarse grid and
    interpolated."""
    from diffrecon.problems.calib import calibrate_file

    s = calibrate_file(scan, output, overwrite=overwrite, slices=slices)
    print_json(s) if as_json else typer.echo(f"wrote coil maps {tuple(s['shape'])} to "
                                              f"{s['coil_maps']}")


# --------------------------------------------------------------------------- run



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
                                          "(means over slices), per_slice, volume, "
                                          "data_range, coverage.")] = False,
):
    """PSNR (dB), SSIM and NMSE as fastMRI computes them (data range = max of the WHOLE
    reference volume, whatever slices the result holds), per slice (scan slice numbers) and
    their mean; `volume` holds fastMRI's volume-level figures. A result with calibrated
    intervals (`run --calibration`) also gets their coverage: the fraction of reference
    pixels inside (mean over slices), the mean width (scan units) and std / RMSE."""
    from diffrecon.metrics import evaluate_file

    m = evaluate_file(result, reference, reference_kind.value)
    if as_json:
        print_json(m)
        return
    typer.echo(f"{result} vs {reference} ({m['reference']}): PSNR {m['psnr']:.2f} dB  "
               f"SSIM {m['ssim']:.4f}  NMSE {m['nmse']:.4g}")
    for s in m["per_slice"]:
        typer.echo(f"  slice {s['slice']}: PSNR {s['psnr']:.2f} dB  SSIM {s['ssim']:.4f}  "
                   f"NMSE {s['nmse']:.4g}")
    for c in m.get("coverage", {}).values():
        ratio = "n/a" if c.get("std_rmse") is None else f"{c['std_rmse']:.3f}"
        held = "" if "rmse_bound_held" not in c else \
            f"  RMSE bound holds on {c['rmse_bound_held']:.0%} of slices"
        where = "" if c.get("foreground") is None else \
            f" (pixels above {c['foreground']:g} x slice max)"
        typer.echo(f"  {c['nominal']:g} interval: coverage {c['coverage']:.4f}{where}  width "
                   f"{c['width']:.4g} ({c['relative_width']:.3g} of the range)  "
                   f"std/RMSE {ratio}{held}")


@app.command()
def view(
    result: Annotated[Path, typer.Argument(help="Result file written by `diffrecon run`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write.")],
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="Scan with ground truth: adds the |error| map and metrics.",
        show_default=False)] = None,
    reference_kind: RefKind = ReferenceKind.auto,
    slice_: Annotated[list[int] | None, typer.Option(
        "--slice", help="Scan slice number(s) to show, as in the scan file and `evaluate` "
                        "(repeatable; default: the result's middle slice).",
        show_default=False)] = None,
):
    """Figure: reconstruction, |error|, posterior std and calibrated interval widths (when
    the result holds them, with the fraction of the reference inside) side by side, rows
    labelled with scan slice numbers; PSNR / SSIM use the whole reference volume's maximum.
    Reads and scores only the slices shown."""
    from diffrecon.figures import save_figure

    try:
        path = save_figure(result, output, reference=reference, slices=slice_,
                           reference_kind=reference_kind.value)
    except ValueError as exc:
        raise InputError(f"{result}: {exc}") from exc
    typer.echo(f"wrote {path}")


# --------------------------------------------------------------------------- demo / train / bench



def _source_checkout() -> Path:
    """The source checkout whose ``benchmarks`` package ``bench`` runs: the folder holding
    ``benchmarks/__init__.py`` and ``pyproject.toml`` above this file, else the current
    directory."""
    for parent in [*Path(__file__).resolve().parents, Path.cwd()]:
        if (parent / "benchmarks" / "__init__.py").is_file() and (
                parent / "pyproject.toml").is_file():
            return parent
    raise InputError("no benchmarks/ package found; diffrecon bench runs from a source "
                     "checkout (benchmarks/ next to pyproject.toml)")


@app.command()
def bench(
    names: Annotated[list[str] | None, typer.Argument(
        help="Benchmarks to run (module names in benchmarks/); default: all.",
        show_default=False)] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke mode of every script "
                                        "(seconds to minutes; numbers not meaningful).")
                     ] = False,
    output_dir: Annotated[Path, typer.Option(
        "-o", "--output-dir", help="Where the reports go: <name>.md per benchmark, the files "
                                   "it writes under <name>/, and RESULTS.md with all of them "
                                   "(created).")] = Path("diffrecon-bench"),
    list_only: Annotated[bool, typer.Option("--list", help="Only list the benchmarks.")
                         ] = False,
):
    """Run the reproducible benchmark scripts of a source checkout (`python -m benchmarks`):
    nothing is written into the source tree."""
    cmd = [sys.executable, "-m", "benchmarks", *(names or [])]
    cmd += ["--list"] if list_only else ["--out", str(output_dir.resolve())]
    cmd += ["--quick"] if quick else []
    code = subprocess.run(cmd, cwd=_source_checkout(), check=False).returncode
    if code:
        raise typer.Exit(code)
