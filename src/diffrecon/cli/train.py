"""``diffrecon train-prior``: train a U-Net denoiser prior (thin over the training code)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from diffrecon.cli.app import app


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

