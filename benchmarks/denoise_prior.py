"""Denoising PSNR of a network prior vs BM3D on held-out images; writes the model card.

    python -m benchmarks.denoise_prior --prior phantom-ct --out results/
    python -m benchmarks.denoise_prior --prior /work/train/mri/prior.pt --kinds anatomy photos
    python -m benchmarks.denoise_prior --prior /work/train/phantom-mri/prior.pt --install
    python -m benchmarks.denoise_prior --quick

``--prior`` is a .pt path or the name of a shipped prior (``priors/weights/<name>.pt``;
default phantom-ct); ``--kinds`` the held-out sets of :mod:`diffrecon.training.report`
(anatomy, photos, phantoms; default phantoms). The model card (and its ``.report.json``)
goes to ``--card``, else to ``--out``/<name>.md, else nowhere; ``--install`` copies the prior
file to ``priors/weights/<name>.pt`` and writes the card there (shipping a prior: the one
case that writes into the source tree). BM3D takes seconds per 128 px image on one CPU
core; ``--limit`` and ``--no-bm3d`` shorten the run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from benchmarks.common import arguments, setup
from diffrecon.priors.network import load_network_prior
from diffrecon.training.report import SIGMAS, denoising_report, report_table, write_model_card

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "diffrecon" / "priors" / "weights"


def resolve(prior: str) -> Path:
    path = Path(prior)
    return path if path.suffix == ".pt" or path.is_file() else WEIGHTS / f"{prior}.pt"


def main(argv=None) -> str:
    p = arguments(__doc__, "the default prior on 2 held-out phantoms at sigma 0.1, no BM3D")
    p.add_argument("--prior", default="phantom-ct", help="a .pt file or a shipped prior name")
    p.add_argument("--kinds", nargs="+", choices=["anatomy", "photos", "phantoms"],
                   default=["phantoms"], help="held-out image sets, one table each")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    p.add_argument("--limit", type=int, default=None,
                   help="only the first LIMIT images of each set")
    p.add_argument("--no-bm3d", action="store_true")
    p.add_argument("--card", type=Path, default=None,
                   help="model card path (default: <--out>/<name>.md, none without --out)")
    p.add_argument("--install", action="store_true",
                   help="copy the prior to priors/weights/<name>.pt and write the card there")
    a = p.parse_args(argv)
    setup(a.threads)
    if a.quick:
        a.limit, a.sigmas, a.no_bm3d = 2, [0.1], True
    path = resolve(a.prior)
    prior = load_network_prior(path)
    card = a.card or (a.out / f"{prior.name}.md" if a.out is not None else None)
    if a.install:
        target = WEIGHTS / f"{prior.name}.pt"
        if target.resolve() != path.resolve():
            shutil.copyfile(path, target.with_suffix(".pt.tmp"))
            target.with_suffix(".pt.tmp").replace(target)
        path, card = target, target.with_suffix(".md")
    t0 = time.perf_counter()
    reports = [denoising_report(prior, kind, sigmas=tuple(a.sigmas), baseline=not a.no_bm3d,
                                limit=a.limit) for kind in a.kinds]
    text = f"{prior.name} ({path}), {time.perf_counter() - t0:.0f} s"
    for rep in reports:
        text += (f"\n\nheld-out {rep['kind']}: {', '.join(rep['images'])}\n\n"
                 + report_table(rep))
    if card is not None:
        card.parent.mkdir(parents=True, exist_ok=True)
        write_model_card(card, prior, reports)
        card.with_suffix(".report.json").write_text(json.dumps(reports, indent=1))
        text += f"\n\nmodel card: {card}"
    print(text)
    return text


if __name__ == "__main__":
    main()
