"""``diffrecon simulate {mri,ct,blur,superres}``: simulated scans with ground truth."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from diffrecon.cli.app import app, make_parent
from diffrecon.errors import InputError

simulate_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                           help="Write simulated scans with ground truth (MRI, CT, blur, "
                                "super-resolution).")
app.add_typer(simulate_app, name="simulate")


class MaskType(str, Enum):
    random = "random"
    equispaced = "equispaced"
    equispaced_fraction = "equispaced_fraction"
    poisson = "poisson"


class Kernel(str, Enum):
    gaussian = "gaussian"
    motion = "motion"
    uniform = "uniform"


Output = Annotated[Path, typer.Option("-o", "--output", callback=make_parent,
                                      help="Scan file to write (HDF5). Missing directories "
                                           "are created.")]
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


class Geometry(str, Enum):
    parallel = "parallel"
    fan = "fan"


class Detector(str, Enum):
    flat = "flat"
    curved = "curved"


@simulate_app.command("ct")
def simulate_ct(
    output: Output,
    size: Size = 128, slices: Slices = 2, seed: Seed = 0,
    views: Annotated[int, typer.Option("--views", help="Number of projection angles.",
                                       min=1)] = 30,
    angle_range: Annotated[float | None, typer.Option(
        "--angle-range", help="Angular range covered by the views, in DEGREES (default 180 "
                              "for parallel beam, 360 for fan beam; less = limited angle).",
        min=1e-3, max=360.0, show_default=False)] = None,
    noise: Annotated[float, typer.Option(
        "--noise", help="Sinogram noise std as a fraction of the largest line integral.",
        min=0.0)] = 0.0,
    geometry: Annotated[Geometry, typer.Option(
        "--geometry", help="parallel beam, or fan beam (clinical proportions by default: "
                           "source-to-isocentre 1.66 x the field of view, source-to-detector "
                           "1.825 x that, one detector per pixel at the isocentre).")
    ] = Geometry.parallel,
    detectors: Annotated[int | None, typer.Option(
        "--detectors", help="Detector count (default: ceil(sqrt(2) size), covering the "
                            "image).", min=1, show_default=False)] = None,
    pixel_size: Annotated[float, typer.Option(
        "--pixel-size", help="Pixel size in mm (fan-beam distances are in mm).", min=1e-6)
    ] = 1.0,
    source_to_isocentre: Annotated[float | None, typer.Option(
        "--source-to-isocentre", help="Fan beam: source-to-isocentre distance in mm.",
        min=1e-6, show_default=False)] = None,
    source_to_detector: Annotated[float | None, typer.Option(
        "--source-to-detector", help="Fan beam: source-to-detector distance in mm.",
        min=1e-6, show_default=False)] = None,
    detector_spacing: Annotated[float | None, typer.Option(
        "--detector-spacing", help="Fan beam: detector spacing in mm at the detector (arc "
                                   "length on a curved detector).", min=1e-6,
        show_default=False)] = None,
    detector_shape: Annotated[Detector, typer.Option(
        "--detector-shape", help="Fan beam: flat panel or curved (equiangular arc centred on "
                                 "the source).")] = Detector.flat,
):
    """Simulated 2D CT scan, parallel or fan beam (sparse-view or limited-angle), with ground
    truth; the geometry is written as the CT layout's attributes (README)."""
    import math

    from diffrecon.datasets.simulate import simulate_ct as sim

    fan = geometry is Geometry.fan
    given = {"--source-to-isocentre": source_to_isocentre,
             "--source-to-detector": source_to_detector, "--detector-spacing": detector_spacing}
    if not fan:
        extra = [k for k, v in given.items() if v is not None]
        if detector_shape is not Detector.flat:
            extra.append("--detector-shape")
        if extra:
            raise InputError(f"{', '.join(extra)} apply to --geometry fan only")
    degrees = angle_range if angle_range is not None else (360.0 if fan else 180.0)
    _done(sim(output, size=size, slices=slices, views=views,
              angle_range=math.radians(degrees), noise=noise, seed=seed,
              n_detectors=detectors, geometry=geometry.value, pixel_size_mm=pixel_size,
              source_to_isocentre_mm=source_to_isocentre,
              source_to_detector_mm=source_to_detector, detector_spacing_mm=detector_spacing,
              detector_shape=detector_shape.value))


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
