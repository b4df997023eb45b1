"""Denoising PSNR of a network prior vs BM3D on held-out test phantoms; writes the model card.

    python benchmarks/denoise_prior.py --prior phantom-ct --family ellipses
    python benchmarks/denoise_prior.py --prior /work/train/phantom-mri/prior.pt --family mri \
        --card src/diffrecon/priors/weights/phantom-mri.md

``--prior`` is a .pt path or the name of a shipped prior (``priors/weights/<name>.pt``). The
card goes to ``--card`` or next to the prior as ``<name>.md``; ``--install`` first copies the
prior file to ``priors/weights/<name>.pt`` and writes the card there (shipping a prior).
BM3D takes seconds per 128 px image on one CPU core; ``--n`` and ``--no-bm3d`` shorten the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from diffrecon.priors.network import load_network_prior
from diffrecon.priors.training import denoising_report, report_table, write_model_card

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "diffrecon" / "priors" / "weights"


def resolve(prior: str) -> Path:
    path = Path(prior)
    return path if path.suffix == ".pt" or path.is_file() else WEIGHTS / f"{prior}.pt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prior", required=True, help="a .pt file or a shipped prior name")
    p.add_argument("--family", required=True, choices=["ellipses", "mri"])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.5])
    p.add_argument("--n", type=int, default=16, help="number of test phantoms")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--no-bm3d", action="store_true")
    p.add_argument("--card", default=None, help="model card path (default: <prior dir>/<name>.md)")
    p.add_argument("--install", action="store_true",
                   help="copy the prior to priors/weights/<name>.pt and write the card there")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    path = resolve(a.prior)
    prior = load_network_prior(path)
    if a.install:
        target = WEIGHTS / f"{prior.name}.pt"
        if target.resolve() != path.resolve():
            shutil.copyfile(path, target.with_suffix(".pt.tmp"))
            target.with_suffix(".pt.tmp").replace(target)
        path = target
    t0 = time.perf_counter()
    report = denoising_report(prior, a.family, sigmas=tuple(a.sigmas), n=a.n, size=a.size,
                              baseline=not a.no_bm3d)
    print(f"{prior.name} ({path}), {a.n} test phantoms, {time.perf_counter() - t0:.0f} s")
    print(report_table(report))
    card = Path(a.card) if a.card else path.with_name(f"{prior.name}.md")
    write_model_card(card, prior, report)
    card.with_suffix(".report.json").write_text(json.dumps(report, indent=1))
    print(f"model card: {card}")


if __name__ == "__main__":
    main()
