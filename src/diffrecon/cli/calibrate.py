"""``diffrecon calibrate``: conformal calibration of the interval maps from result files and
the scans holding their references (``pipeline.calibrate``, ``diffrecon.calibration``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffrecon.cli.app import app, make_parent, print_json
from diffrecon.cli.tools import ReferenceKind, RefKind
from diffrecon.errors import InputError


def parse_levels(text: str) -> list[float]:
    """'0.8,0.9,0.95' -> [0.8, 0.9, 0.95]; ``InputError`` naming --levels otherwise."""
    try:
        levels = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--levels {text!r} is not valid; expected comma-separated "
                         f"fractions such as 0.8,0.9,0.95") from None
    if not levels or not all(0 < lv < 1 for lv in levels):
        raise InputError(f"--levels {text!r} is not valid; expected comma-separated "
                         f"fractions in (0, 1) such as 0.8,0.9,0.95")
    return levels


@app.command()
def calibrate(
    inputs: Annotated[list[Path], typer.Argument(
        help="Result files of `diffrecon run` (all for one task) and the scans holding "
             "their references (files or directories with both; a result is paired with "
             "the scan its 'input' attribute names).", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Calibration file (JSON, "
                                         "written atomically).")],
    levels: Annotated[str, typer.Option(
        "--levels", help="Nominal coverages to calibrate, comma-separated (each needs at "
                         "least 1/(1-level) - 1 units: 4 for 0.8, 9 for 0.9, 19 for "
                         "0.95).")] = "0.8,0.9,0.95",
    unit: Annotated[str, typer.Option(
        "--unit", help="Exchangeable unit: slice, or scan (honest when slices of one scan "
                       "are correlated; needs more scans).")] = "slice",
    foreground: Annotated[float | None, typer.Option(
        "--foreground", help="Count only pixels whose reference exceeds this fraction of "
                             "its slice maximum (e.g. 0.1); intervals are drawn everywhere.",
        show_default=False)] = None,
    floor: Annotated[float, typer.Option(
        "--floor", help="Interval spread std + floor * max|mean| of the slice (keeps "
                        "intervals open where all draws agree).")] = 1e-3,
    smooth: Annotated[float, typer.Option(
        "--smooth", help="Pool the std over a Gaussian window of this std in pixels before "
                         "scaling it (sqrt of the smoothed variance; 0: none). With 2-4 "
                         "draws, 2 px gives much narrower intervals at the same coverage "
                         "(benchmarks/RESULTS.md 0c).")] = 0.0,
    reference_kind: RefKind = ReferenceKind.auto,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing "
                                            "output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the calibration file's "
                                          "contents.")] = False,
):
    """Calibrate interval maps on scans whose reference is known (conformal risk control):
    for a new scan of the same task, `run --calibration` intervals at level L cover at least
    a fraction L of its pixels in expectation (marginal over scans; exchangeable scans
    only)."""
    from diffrecon.pipeline.calibrate import calibrate_results

    lv = parse_levels(levels)
    if output.suffix.lower() != ".json":
        raise InputError(f"-o/--output {output}: expected a .json file name")
    if output.exists() and not overwrite:
        raise InputError(f"-o/--output {output} exists (--overwrite to replace it)")
    if output.is_dir():
        raise InputError(f"-o/--output {output} is a directory, expected a file name")
    if unit not in ("slice", "scan"):
        raise InputError(f"--unit {unit!r} is not valid; expected slice or scan")
    if not floor >= 0:
        raise InputError(f"--floor {floor!r} is not valid; expected a number >= 0")
    if not (0 <= smooth < float("inf")):
        raise InputError(f"--smooth {smooth!r} is not valid; expected a number of pixels >= 0")
    calib = calibrate_results(inputs, lv, unit=unit, foreground=foreground, floor=floor,
                              reference_kind=reference_kind.value, smooth=smooth)
    calib.save(make_parent(output))
    if as_json:
        print_json(calib.to_dict())
        return
    d = calib.diagnostics
    typer.echo(f"wrote {output}: {calib.n_units} calibration units ({calib.unit}s; "
               f"{calib.n_slices} slices), "
               f"task {calib.task.get('modality')} / {calib.task.get('solver')} / "
               f"{calib.task.get('prior')}"
               + (f", std pooled over {calib.smooth:g} px" if calib.smooth else ""))
    for level in calib.levels:
        k = repr(level)
        typer.echo(f"  {level:g}: scale {calib.scales[level]:.4g} x spread; in-sample coverage "
                   f"{d['coverage_gaussian'][k]:.3f} (Gaussian z*std) -> "
                   f"{d['coverage_calibrated'][k]:.3f}, mean width "
                   f"{d['width_calibrated'][k]:.4g}")
