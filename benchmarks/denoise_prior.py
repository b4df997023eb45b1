"""Denoising PSNR of a network prior vs BM3D on held-out test phantoms; writes the model card.

    python -m benchmarks.denoise_prior --prior phantom-ct --out results/
    python -m benchmarks.denoise_prior --prior /work/train/phantom-mri/prior.pt --install
    python -m benchmarks.denoise_prior --quick

``--prior`` is a .pt path or the name of a shipped prior (``priors/weights/<name>.pt``;
default phantom-ct); ``--family`` the phantom family (default: mri for a 2-channel prior,
else ellipses). The model card (and its ``.report.json``) goes to ``--card``, else to
``--out``/<name>.md, else nowhere; ``--install`` copies the prior file to
``priors/weights/<name>.pt`` and writes the card there (shipping a prior: the one case
that writes into the source tree). BM3D takes seconds per 128 px image on one CPU core;
``--n`` and ``--no-bm3d`` shorten the run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from benchmarks.common import arguments, setup
from diffrecon.priors.network import load_network_prior
from diffrecon.priors.training import denoising_report, report_table, write_model_card

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "diffrecon" / "priors" / "weights"


def resolve(prior: str) -> Path:
    path = Path(prior)
    return path if path.suffix == ".pt" or path.is_file() else WEIGHTS / f"{prior}.pt"


def main(argv=None) -> str:
    p = arguments(__doc__, "the default prior on 2 phantoms of 32 px at sigma 0.1, no BM3D")
    p.add_argument("--prior", default="phantom-ct", help="a .pt file or a shipped prior name")
    p.add_argument("--family", choices=["ellipses", "mri"], default=None,
                   help="phantom family (default: mri for a 2-channel prior, else ellipses)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.5])
    p.add_argument("--n", type=int, default=16, help="number of test phantoms")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--no-bm3d", action="store_true")
    p.add_argument("--card", type=Path, default=None,
                   help="model card path (default: <--out>/<name>.md, none without --out)")
    p.add_argument("--install", action="store_true",
                   help="copy the prior to priors/weights/<name>.pt and write the card there")
    a = p.parse_args(argv)
    setup(a.threads)
    if a.quick:
        a.n, a.size, a.sigmas, a.no_bm3d = 2, 32, [0.1], True
    path = resolve(a.prior)
    prior = load_network_prior(path)
    family = a.family or ("mri" if prior.channels == 2 else "ellipses")
    card = a.card or (a.out / f"{prior.name}.md" if a.out is not None else None)
    if a.install:
        target = WEIGHTS / f"{prior.name}.pt"
        if target.resolve() != path.resolve():
            shutil.copyfile(path, target.with_suffix(".pt.tmp"))
            target.with_suffix(".pt.tmp").replace(target)
        path, card = target, target.with_suffix(".md")
    t0 = time.perf_counter()
    report = denoising_report(prior, family, sigmas=tuple(a.sigmas), n=a.n, size=a.size,
                              baseline=not a.no_bm3d)
    text = (f"{prior.name} ({path}), {family} family, {a.n} test phantoms of {a.size} px, "
            f"{time.perf_counter() - t0:.0f} s\n\n{report_table(report)}")
    if card is not None:
        card.parent.mkdir(parents=True, exist_ok=True)
        write_model_card(card, prior, report)
        card.with_suffix(".report.json").write_text(json.dumps(report, indent=1))
        text += f"\n\nmodel card: {card}"
    print(text)
    return text


if __name__ == "__main__":
    main()
