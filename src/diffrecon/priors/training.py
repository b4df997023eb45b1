"""Train a :class:`~diffrecon.priors.network.NetworkPrior` with the EDM denoising loss.

Recipe (Karras et al. 2022, with two documented changes):
- loss: lambda(s) ||D(x + s n, s) - x||^2, lambda = (s^2 + sd^2) / (s sd)^2, sd = sigma_data
  estimated from the training data;
- sigma: with probability ``uniform_fraction`` log-uniform on [sigma_min, sigma_max], else
  EDM log-normal ln(s) ~ N(P_mean, P_std^2) rescaled by sd / 0.5 (EDM's values assume
  sd = 0.5), so both very small and very large sigmas are trained;
- Adam, linear warm-up then cosine decay (or constant), EMA of the weights (the exported
  prior is the EMA).

Data is an infinite deterministic stream: the batch of step k uses phantom indices
``seed * 10^9 + k * batch_size + i`` of the ``train`` split, with crops / flips / rot90 from
``np.random.default_rng([seed, k])``; the noise of step k comes from a torch generator
seeded by ``(seed, k)``. A resumed run therefore reproduces an uninterrupted one bit-exactly
(same device and thread count).
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from diffrecon.datasets.phantoms import phantom
from diffrecon.errors import InputError
from diffrecon.priors.network import (
    NetworkPrior,
    UNet,
    count_parameters,
    load_network_prior,
    save_network_prior,
)

FAMILIES = ("ellipses", "mri")
PHANTOM_SIZE = 128


# ----------------------------------------------------------------------------- data


def _to_channels(img: np.ndarray) -> np.ndarray:
    """(H, W) real -> (1, H, W); complex -> (2, H, W) real/imag; (C, H, W) real kept."""
    if np.iscomplexobj(img):
        return np.stack([img.real, img.imag]).astype(np.float32)
    return (img[None] if img.ndim == 2 else img).astype(np.float32)


class ImageSource:
    """Training images: a phantom family (generated on demand) or images from HDF5 files."""

    def __init__(self, data: str | Sequence[str], channels: int, size: int = PHANTOM_SIZE):
        self.size = size
        self.family = data if isinstance(data, str) and data in FAMILIES else None
        self.images = None
        if self.family is None:
            self.images = _load_h5_images([data] if isinstance(data, str | os.PathLike)
                                          else list(data))
            if self.images.shape[1] != channels:
                raise InputError(f"training data has {self.images.shape[1]} channel(s) but "
                                 f"--channels is {channels}.")
        elif (self.family == "ellipses") != (channels == 1) or channels not in (1, 2):
            raise InputError(f"--channels {channels} does not match family {self.family!r} "
                             "(ellipses: 1, mri: 2).")

    def get(self, index: int) -> np.ndarray:
        """Image ``index`` (C, H, W) float32."""
        if self.family is not None:
            return _to_channels(phantom(self.family, self.size, index, "train"))
        return self.images[index % len(self.images)]


def _load_h5_images(paths: list) -> np.ndarray:
    import h5py

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"--family {str(p)!r} is neither 'ellipses', 'mri' nor an existing "
                             "HDF5 file with an 'image' dataset (file does not exist).")
        with h5py.File(p, "r") as f:
            if "image" not in f:
                raise InputError(f"training file {str(p)!r} has no 'image' dataset.")
            arr = np.asarray(f["image"])
        if arr.ndim == 2:
            arr = arr[None]
        if np.iscomplexobj(arr):
            arr = np.stack([arr.real, arr.imag], axis=1)
        elif arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim != 4:
            raise InputError(f"dataset 'image' in {str(p)!r} must be (N, H, W), (N, C, H, W) "
                             f"or complex (N, H, W); got shape {arr.shape}.")
        out.append(arr.astype(np.float32))
    shapes = {a.shape[1:] for a in out}
    if len(shapes) != 1:
        raise InputError(f"'image' datasets in the training files differ in shape: {shapes}.")
    return np.concatenate(out)


def make_batch(source: ImageSource, step: int, batch_size: int, crop: int, seed: int) -> np.ndarray:
    """The deterministic training batch of ``step``: (B, C, crop, crop) float32."""
    rng = np.random.default_rng([seed, step])
    base = seed * 10**9 + step * batch_size
    out = []
    for i in range(batch_size):
        img = source.get(base + i)
        h, w = img.shape[-2:]
        if h < crop or w < crop:
            raise InputError(f"training images ({h}x{w}) are smaller than --crop {crop}.")
        r, c = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        img = img[:, r:r + crop, c:c + crop]
        if rng.random() < 0.5:
            img = img[:, :, ::-1]
        img = np.rot90(img, k=int(rng.integers(4)), axes=(1, 2))
        out.append(np.ascontiguousarray(img))
    return np.stack(out)


class _Prefetcher:
    """Background thread producing ``make_batch`` for consecutive steps."""

    def __init__(self, fn: Callable[[int], np.ndarray], start: int, stop: int, depth: int = 3):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = False
        self.thread = threading.Thread(target=self._run, args=(fn, start, stop), daemon=True)
        self.thread.start()

    def _run(self, fn, start, stop):
        for k in range(start, stop):
            if self.stopped:
                return
            try:
                item = (k, fn(k), None)
            except Exception as exc:  # noqa: BLE001 - re-raised in the main thread
                item = (k, None, exc)
            while not self.stopped:
                try:
                    self.q.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def get(self, step: int) -> np.ndarray:
        k, batch, exc = self.q.get()
        if exc is not None:
            raise exc
        assert k == step, (k, step)
        return batch

    def close(self):
        self.stopped = True


def estimate_data_stats(source: ImageSource, channels: int, n: int = 64) -> tuple[float, float]:
    """(data_mean, sigma_data) from ``n`` training images. The mean is forced to 0 for
    2-channel (complex) data, whose phase makes it zero in distribution."""
    if source.images is not None:
        imgs = source.images[:n]
    else:
        imgs = np.stack([source.get(10**8 + i) for i in range(n)])  # outside the step stream
    mean = 0.0 if channels == 2 else float(imgs.mean())
    sd = float(np.sqrt(np.mean((imgs.astype(np.float64) - mean) ** 2)))
    return mean, sd


# ----------------------------------------------------------------------------- training


def sample_sigmas(batch: int, generator: torch.Generator, *, sigma_min: float, sigma_max: float,
                  sigma_data: float, p_mean: float = -1.2, p_std: float = 1.2,
                  uniform_fraction: float = 0.25) -> torch.Tensor:
    """Training sigmas (batch,) float32 on the generator's device (see module docstring)."""
    dev = generator.device
    normal = torch.randn(batch, generator=generator, device=dev)
    u = torch.rand(batch, generator=generator, device=dev)
    pick = torch.rand(batch, generator=generator, device=dev) < uniform_fraction
    log_normal = p_mean + p_std * normal + math.log(sigma_data / 0.5)
    log_uniform = math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min))
    log_s = torch.where(pick, log_uniform, log_normal)
    return log_s.clamp(math.log(sigma_min), math.log(sigma_max)).exp()


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _atomic_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train_prior(out_dir: str | os.PathLike, *, family: str | Sequence[str] = "ellipses",
                channels: int = 1, name: str | None = None, crop: int = 64,
                batch_size: int = 16, steps: int = 10_000, lr: float = 2e-4,
                warmup: int = 200, lr_schedule: str = "cosine",
                ema_halflife_steps: float | None = None, ema_decay: float = 0.999,
                sigma_min: float = 0.002, sigma_max: float = 80.0,
                uniform_fraction: float = 0.25, base: int = 32, mults: tuple = (1, 2, 4),
                blocks: int = 2, checkpoint_every: int = 500, resume: bool = True,
                device: str = "auto", amp: bool = False, seed: int = 0,
                phantom_size: int = PHANTOM_SIZE, progress: bool = False,
                callback: Callable[[dict], None] | None = None,
                log_every: int = 50, stop_at: int | None = None) -> NetworkPrior:
    """Train a U-Net denoiser prior; returns the EMA prior (also in ``out_dir/prior.pt``).

    ``family``: 'ellipses' (1 channel, data range (0, 1)), 'mri' (2 channels real/imag,
    |x| <= 1, data range (-1, 1)), or HDF5 path(s) each with an ``image`` dataset
    ((N, H, W) real or complex, or (N, C, H, W)). ``out_dir/checkpoint.pt`` (model, EMA,
    optimizer, step, RNG states) is written atomically every ``checkpoint_every`` steps, with
    the EMA prior exported to ``out_dir/prior.pt``; with ``resume`` an existing checkpoint
    is continued. ``callback`` receives ``{'step', 'loss', 'lr', 'elapsed'}`` every
    ``log_every`` steps. ``amp`` enables bf16 autocast on CUDA only. ``stop_at`` ends this
    session after that step (with a checkpoint) without changing the schedule of ``steps``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if lr_schedule not in ("cosine", "constant"):
        raise InputError(f"--lr-schedule must be 'cosine' or 'constant', got {lr_schedule!r}.")
    if crop % 4:
        raise InputError(f"--crop must be a multiple of 4, got {crop}.")
    dev = _resolve_device(device)
    source = ImageSource(family, channels, phantom_size)
    is_phantom = source.family is not None
    name = name or out.name
    if is_phantom:
        data_range = (0.0, 1.0) if source.family == "ellipses" else (-1.0, 1.0)
    else:
        lo, hi = float(source.images.min()), float(source.images.max())
        data_range = (lo, hi)
    decay = 0.5 ** (1 / ema_halflife_steps) if ema_halflife_steps else ema_decay
    recipe = {"family": family if isinstance(family, str) else list(map(str, family)),
              "channels": channels, "crop": crop, "batch_size": batch_size, "steps": steps,
              "lr": lr, "warmup": warmup, "lr_schedule": lr_schedule, "ema_decay": decay,
              "sigma_min": sigma_min, "sigma_max": sigma_max, "p_mean": -1.2, "p_std": 1.2,
              "uniform_fraction": uniform_fraction, "seed": seed, "phantom_size": phantom_size,
              "optimizer": "Adam(betas=(0.9, 0.999))", "loss": "EDM weighted MSE"}

    torch.manual_seed(seed)
    net = UNet(channels, base=base, mults=tuple(mults), blocks=blocks).to(dev)
    ema = UNet(channels, base=base, mults=tuple(mults), blocks=blocks).to(dev)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    ckpt_path = out / "checkpoint.pt"
    start, elapsed, history = 0, 0.0, []
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if ck["config"] != net.config:
            raise InputError(f"checkpoint {str(ckpt_path)!r} was made with network config "
                             f"{ck['config']}, not {net.config}.")
        net.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        start, elapsed, history = ck["step"], ck["elapsed"], list(ck["history"])
        data_mean, sigma_data = ck["data_mean"], ck["sigma_data"]
        torch.set_rng_state(ck["torch_rng"].cpu())
    else:
        data_mean, sigma_data = estimate_data_stats(source, channels)
    recipe.update(data_mean=data_mean, sigma_data=sigma_data)

    def wrap(module):
        return NetworkPrior(module, name=name, data_range=data_range, sigma_min=sigma_min,
                            sigma_max=sigma_max, sigma_data=sigma_data, data_mean=data_mean,
                            autocast=amp)

    model, ema_prior = wrap(net), wrap(ema)

    def export(step):
        extra = {"recipe": recipe, "steps": step, "wall_time_s": round(elapsed, 1),
                 "parameters": count_parameters(ema), "final_loss": _recent_loss(history),
                 "device": str(dev)}
        save_network_prior(ema_prior, out / "prior.pt", extra)

    def checkpoint(step):
        ck = {"config": net.config, "model": net.state_dict(), "ema": ema.state_dict(),
              "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
              "history": history, "data_mean": data_mean, "sigma_data": sigma_data,
              "torch_rng": torch.get_rng_state(), "recipe": recipe}
        if dev.type == "cuda":
            ck["cuda_rng"] = torch.cuda.get_rng_state(dev)
        _atomic_save(ck, ckpt_path)
        export(step)

    end = steps if stop_at is None else min(steps, stop_at)
    prefetch = _Prefetcher(lambda k: make_batch(source, k, batch_size, crop, seed), start, end)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=name, dynamic_ncols=True)
    ema_params = list(ema.parameters())
    net_params = list(net.parameters())
    gen = torch.Generator(device=dev)
    running = torch.zeros((), device=dev)
    t_last = time.perf_counter()
    try:
        for step in range(start, end):
            x = torch.from_numpy(prefetch.get(step)).to(dev, non_blocking=True)
            gen.manual_seed(seed * 1_000_003 + step)
            sigma = sample_sigmas(x.shape[0], gen, sigma_min=sigma_min, sigma_max=sigma_max,
                                  sigma_data=sigma_data, uniform_fraction=uniform_fraction)
            noise = torch.randn(x.shape, generator=gen, device=dev)
            weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
            for g in opt.param_groups:
                g["lr"] = lr * _lr_factor(step, steps, warmup, lr_schedule)
            denoised = model.precond(x + sigma[:, None, None, None] * noise, sigma)
            loss = (weight[:, None, None, None] * (denoised - x) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            beta = min(decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, net_params, 1 - beta)
            running += loss.detach()
            done = step + 1
            if done % log_every == 0 or done == steps:
                now = time.perf_counter()
                elapsed += now - t_last
                t_last = now
                n = log_every if done % log_every == 0 else done % log_every
                info = {"step": done, "loss": float(running) / n,
                        "lr": opt.param_groups[0]["lr"], "elapsed": elapsed}
                running.zero_()
                history.append([done, info["loss"]])
                if callback is not None:
                    callback(info)
                if bar is not None:
                    bar.set_postfix(loss=f"{info['loss']:.4f}")
            if bar is not None:
                bar.update(1)
            if done % checkpoint_every == 0 or done == end:
                elapsed += time.perf_counter() - t_last
                t_last = time.perf_counter()
                checkpoint(done)
    finally:
        prefetch.close()
        if bar is not None:
            bar.close()
    if start >= end and not (out / "prior.pt").is_file():
        export(start)
    return load_network_prior(out / "prior.pt", map_location=dev)


def _recent_loss(history: list) -> float | None:
    if not history:
        return None
    tail = [h[1] for h in history[-5:]]
    return float(sum(tail) / len(tail))


# ----------------------------------------------------------------------------- evaluation


def psnr(est: np.ndarray, ref: np.ndarray, peak: float) -> float:
    """10 log10(peak^2 / MSE); for (2, H, W) real/imag images the MSE is of the complex error
    per pixel (|est - ref|^2 averaged over pixels)."""
    err = (est - ref) ** 2
    mse = err.sum(0).mean() if ref.shape[0] == 2 else err.mean()
    return float(10 * np.log10(peak**2 / max(mse, 1e-30)))


def bm3d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D (Dabov et al. 2007, package ``bm3d``, profile 'np') per channel: (C, H, W)."""
    import bm3d

    return np.stack([np.asarray(bm3d.bm3d(c.astype(np.float64), sigma_psd=sigma), np.float32)
                     for c in noisy])


def denoising_report(prior, family: str, sigmas=(0.02, 0.05, 0.1, 0.2, 0.5), n: int = 16,
                     size: int = 128, split: str = "test", baseline: bool = True,
                     seed: int = 1234) -> dict:
    """Mean PSNR (dB) of the prior and of BM3D on ``n`` held-out phantoms per sigma.

    Noise is i.i.d. Gaussian with std sigma per real channel (for MRI: on real and imag),
    seeded by ``(seed, i, sigma index)``. The peak is 1 (ellipses in [0, 1]; MRI magnitude
    <= 1, PSNR of the complex error). BM3D is applied to each channel separately with the
    known sigma (for MRI: to real and imag). Returns ``{'sigmas', 'prior', 'bm3d', 'noisy'}``
    with one list entry per sigma.
    """
    if family not in FAMILIES:
        raise InputError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}.")
    dev = next(prior.parameters()).device
    clean = [_to_channels(phantom(family, size, i, split)) for i in range(n)]
    rows = {"sigmas": list(sigmas), "prior": [], "bm3d": [], "noisy": []}
    for j, s in enumerate(sigmas):
        noisy = [c + s * np.random.default_rng([seed, i, j]).standard_normal(c.shape)
                 .astype(np.float32) for i, c in enumerate(clean)]
        with torch.no_grad():
            den = []
            for k in range(0, n, 8):
                xb = torch.from_numpy(np.stack(noisy[k:k + 8])).to(dev)
                den.append(prior.denoise(xb, float(s)).cpu().numpy())
            den = np.concatenate(den)
        rows["prior"].append(float(np.mean([psnr(d, c, 1.0) for d, c in zip(den, clean,
                                                                                strict=True)])))
        rows["noisy"].append(float(np.mean([psnr(z, c, 1.0) for z, c in zip(noisy, clean,
                                                                                strict=True)])))
        if baseline:
            rows["bm3d"].append(float(np.mean([psnr(bm3d_denoise(z, s), c, 1.0)
                                               for z, c in zip(noisy, clean, strict=True)])))
    rows.update(family=family, n=n, size=size, split=split)
    return rows


def report_table(report: dict) -> str:
    """Markdown table of a :func:`denoising_report`."""
    lines = ["| sigma | noisy PSNR | prior PSNR | BM3D PSNR | prior - BM3D |",
             "|---:|---:|---:|---:|---:|"]
    for j, s in enumerate(report["sigmas"]):
        b = report["bm3d"][j] if report["bm3d"] else None
        p = report["prior"][j]
        bs, ds = (f"{b:.2f}", f"{p - b:+.2f}") if b is not None else ("-", "-")
        lines.append(f"| {s:g} | {report['noisy'][j]:.2f} | {p:.2f} | {bs} | {ds} |")
    return "\n".join(lines)


def write_model_card(path: str | os.PathLike, prior: NetworkPrior, report: dict | None) -> Path:
    """Write ``<name>.md``: data, recipe, steps, wall time, parameter count, PSNR table."""
    extra = getattr(prior, "extra", {}) or {}
    recipe = extra.get("recipe", {})
    fam = recipe.get("family", "?")
    data = {"ellipses": "random-ellipse phantoms (DIVal-style, `diffrecon.datasets.phantoms`, "
                        "train split), real, range [0, 1]",
            "mri": "complex MR-like phantoms (`diffrecon.datasets.phantoms`, train split) as "
                   "2 channels real/imag, |x| <= 1"}.get(fam, f"HDF5 `image` datasets: {fam}")
    wall = extra.get("wall_time_s")
    lines = [f"# Prior `{prior.name}`", "",
             f"- Data: {data}; {recipe.get('phantom_size', '?')} px images, random "
             f"{recipe.get('crop', '?')} px crops, flips and rot90.",
             f"- Network: U-Net, EDM preconditioning, {prior.channels} channel(s), "
             f"{count_parameters(prior)} parameters, config {prior.net.config}.",
             f"- Metadata: data_range {list(prior.data_range)}, sigma in [{prior.sigma_min:g}, "
             f"{prior.sigma_max:g}], sigma_data {prior.sigma_data:.4f}, data_mean "
             f"{prior.data_mean:.4f}, size_multiple {prior.size_multiple}.",
             f"- Training: {extra.get('steps', '?')} steps, wall time "
             f"{(wall / 3600):.2f} h on {extra.get('device', '?')}" if wall is not None
             else f"- Training: {extra.get('steps', '?')} steps.",
             f"- Final loss (EDM-weighted, last logs): {extra.get('final_loss')}",
             f"- Recipe: `{recipe}`",
             f"- Checksum (sha256): `{prior.checksum}`", ""]
    if report is not None:
        lines += [f"## Denoising on {report['n']} held-out `{report['split']}` "
                  f"{report['family']} phantoms ({report['size']} px)", "",
                  "Gaussian noise of std sigma per real channel; PSNR in dB with peak 1 "
                  "(MRI: complex error); BM3D per channel with the true sigma.", "",
                  report_table(report), ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffrecon.priors.training",
                                description="Train a diffrecon network prior.")
    p.add_argument("--name", required=True)
    p.add_argument("--family", nargs="+", default=["ellipses"],
                   help="'ellipses', 'mri' or HDF5 file(s) with an 'image' dataset")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--lr-schedule", default="cosine")
    p.add_argument("--ema-halflife-steps", type=float, default=None)
    p.add_argument("--base", type=int, default=32)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    a = p.parse_args(argv)
    family = a.family[0] if len(a.family) == 1 else a.family
    t0 = time.perf_counter()

    def log(info):
        rate = info["step"] / max(info["elapsed"], 1e-9)
        print(f"step {info['step']:>7d}  loss {info['loss']:.5f}  lr {info['lr']:.2e}  "
              f"elapsed {info['elapsed'] / 60:7.1f} min  ({time.perf_counter() - t0:.0f} s "
              f"this session, {rate:.3f} steps/s overall)", flush=True)

    print(f"train {a.name}: {vars(a)}", flush=True)
    prior = train_prior(a.out, family=family, channels=a.channels, name=a.name, crop=a.crop,
                        batch_size=a.batch_size, steps=a.steps, lr=a.lr, warmup=a.warmup,
                        lr_schedule=a.lr_schedule, ema_halflife_steps=a.ema_halflife_steps,
                        base=a.base, checkpoint_every=a.checkpoint_every,
                        resume=not a.no_resume, device=a.device, amp=a.amp, seed=a.seed,
                        callback=log, log_every=a.log_every)
    print(f"done: {Path(a.out) / 'prior.pt'} checksum {prior.checksum}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
