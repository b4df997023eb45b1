"""``diffrecon train-prior``: train a U-Net denoiser prior (thin over
:func:`diffrecon.training.loop.train_prior` and :mod:`diffrecon.training.report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from diffrecon.cli.app import app
from diffrecon.errors import as_input_error

REPORTS = ("anatomy", "photos", "phantoms", "none")


def default_report(family: Any) -> str:
    """Held-out images that suit a training family: the phantom test split for the phantom
    families, photographs for the photographic mixtures, real anatomy otherwise."""
    if family in ("ellipses", "mri-phantoms"):
        return "phantoms"
    return "photos" if family in ("natural", "gray") else "anatomy"


@app.command("train-prior")
def train_prior_cmd(
    output_dir: Annotated[Path, typer.Option("-o", "--output-dir", help="Directory for "
                                             "checkpoint.pt and the exported prior.pt.")],
    family: Annotated[list[str], typer.Option(
        "--family", help="Training family: mri (2 channels), ct, natural, gray, ellipses, "
                         "mri-phantoms (see diffrecon.training.data), or HDF5 file(s) with an "
                         "'image' dataset (repeatable). The channel count follows the "
                         "family or the files.")] = ["ellipses"],  # noqa: B006
    name: Annotated[str | None, typer.Option("--name", help="Prior name (default: the "
                                             "directory name).", show_default=False)] = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps.", min=0)] = 10_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.", min=1)
                          ] = 16,
    crop: Annotated[int, typer.Option("--crop", help="Training crop size in pixels "
                                      "(multiple of 4).", min=4)] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 2e-4,
    warmup: Annotated[int, typer.Option("--warmup", help="Linear warm-up steps.", min=0)
                      ] = 200,
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="After warm-up: cosine "
                                             "(decay to 0.1 lr) or constant.")] = "cosine",
    ema_halflife_steps: Annotated[float | None, typer.Option(
        "--ema-halflife-steps", help="EMA half-life in steps (default: EMA decay 0.999).",
        show_default=False)] = None,
    base: Annotated[int, typer.Option("--base", help="U-Net base channel count.", min=1)] = 32,
    mults: Annotated[str, typer.Option("--mults", help="Channel multipliers per U-Net level, "
                                       "comma-separated.")] = "1,2,4",
    init_from: Annotated[str | None, typer.Option(
        "--init-from", help="Warm start from a trained prior of the same architecture (or "
                            "of it less its last level: grown function-preservingly).",
        show_default=False)] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between "
                                                  "checkpoints.", min=1)] = 500,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue an existing "
                                         "checkpoint in the output directory.")] = True,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:INDEX.")
                      ] = "auto",
    workers: Annotated[int, typer.Option("--workers", help="Background processes drawing "
                                         "the training batches (0: in this process).", min=0)
                       ] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data stream and init.")] = 0,
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision (bf16 autocast; CUDA "
                                      "only, ignored on CPU).")] = False,
    report: Annotated[str | None, typer.Option(
        "--report", help="Held-out images for the final denoising report (PSNR per sigma): "
                         "anatomy, photos, phantoms or none (default: phantoms for the "
                         "phantom families, photos for natural / gray, else anatomy).",
                         show_default=False)] = None,
    log_every: Annotated[int, typer.Option("--log-every", help="Steps between log lines.",
                                           min=1)] = 50,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress log.")] = False,
):
    """Train a U-Net denoiser prior with the EDM loss; resumable (bit-exact on the same
    device and thread count). Ends with a denoising report on held-out images."""
    from diffrecon.training.loop import train_prior
    from diffrecon.training.report import denoising_report, report_table

    fam: Any = family[0] if len(family) == 1 else family
    kind = report or default_report(fam)
    if kind not in REPORTS:
        raise typer.BadParameter(f"must be one of {', '.join(REPORTS)}, got {kind!r}",
                                 param_hint="'--report'")
    try:
        levels = tuple(int(m) for m in mults.split(","))
    except ValueError:
        raise typer.BadParameter(f"must be comma-separated integers, got {mults!r}",
                                 param_hint="'--mults'") from None

    def log(info):
        if not quiet:
            typer.echo(f"step {info['step']:>7d}  loss {info['loss']:.5f}  lr {info['lr']:.2e}"
                       f"  elapsed {info['elapsed'] / 60:.1f} min", err=True)

    try:
        prior = train_prior(output_dir, family=fam, name=name, crop=crop,
                            batch_size=batch_size, steps=steps, lr=lr, warmup=warmup,
                            lr_schedule=lr_schedule, ema_halflife_steps=ema_halflife_steps,
                            base=base, mults=levels, init_from=init_from,
                            checkpoint_every=checkpoint_every, resume=resume, device=device,
                            workers=workers, seed=seed, amp=amp, callback=log,
                            log_every=log_every)
    except ValueError as exc:   # the loop's checks name the offending option
        raise as_input_error(exc, "train-prior") from None
    typer.echo(f"wrote {output_dir / 'prior.pt'} (sha256 {prior.checksum})")
    if kind != "none":
        rows = denoising_report(prior, kind, baseline=False)
        typer.echo(f"denoising PSNR (dB) on {len(rows['images'])} held-out {kind} images:")
        typer.echo(report_table(rows))
