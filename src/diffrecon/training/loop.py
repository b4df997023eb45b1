"""Train a :class:`~diffrecon.priors.network.NetworkPrior` with the EDM denoising loss.

Recipe (Karras et al. 2022, with two documented changes):
- loss: lambda(s) ||D(x + s n, s) - x||^2, lambda = (s^2 + sd^2) / (s sd)^2, sd = sigma_data
  estimated from the training data;
- sigma: with probability ``uniform_fraction`` log-uniform on [sigma_min, sigma_max], else
  EDM log-normal ln(s) ~ N(P_mean, P_std^2) rescaled by sd / 0.5 (EDM's values assume
  sd = 0.5), so both very small and very large sigmas are trained;
- Adam, linear warm-up then cosine decay (or constant), EMA of the weights (the exported
  prior is the EMA).

Data (:mod:`diffrecon.training.data`): the batch of step k depends only on (seed, k); it is
drawn in ``workers`` background processes. The noise of step k comes from a torch generator
seeded by (seed, k). A resumed run therefore reproduces an uninterrupted one bit-exactly
(same device and thread count). ``init_from`` warm-starts from a trained prior of the same
architecture.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from diffrecon.priors.network import (
    NetworkPrior,
    UNet,
    count_parameters,
    load_network_prior,
    save_network_prior,
)
from diffrecon.training import data


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


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def data_statistics(batches: Callable[[int], np.ndarray], channels: int,
                    n_batches: int = 8) -> dict:
    """data_mean (0 for complex data, whose random phase makes it zero in distribution),
    sigma_data and the 0.1 / 99.9 percentiles, from batches drawn outside the step stream."""
    imgs = np.concatenate([batches(10**8 + k) for k in range(n_batches)]).astype(np.float64)
    mean = 0.0 if channels == 2 else float(imgs.mean())
    return {"data_mean": mean, "sigma_data": float(np.sqrt(np.mean((imgs - mean) ** 2))),
            "data_range": [float(np.percentile(imgs, 0.1)), float(np.percentile(imgs, 99.9))]}


class _StepBatches(torch.utils.data.IterableDataset):
    """Batches of steps [start, stop) in order (one worker keeps the order)."""

    def __init__(self, fn: Callable[[int], np.ndarray], start: int, stop: int):
        self.fn, self.start, self.stop = fn, start, stop

    def __iter__(self):
        for k in range(self.start, self.stop):
            yield k, torch.from_numpy(self.fn(k))


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def grow_unet(small: UNet, mult: int) -> UNet:
    """A U-Net with one more (coarser) level of width ``base * mult`` that computes exactly
    the function of ``small`` (function-preserving growth, in the spirit of Net2Net, Chen
    et al. 2016): the old levels are copied; the new bottleneck's decoder at the old
    bottleneck's level passes the encoder features through (skip weights sqrt(2)^blocks on
    those channels, zero on the upsampled ones, zero second convolutions), so training
    starts from the small network and learns to use the new level."""
    cfg = dict(small.config)
    big = UNet(cfg["channels"], base=cfg["base"], mults=(*cfg["mults"], mult),
               blocks=cfg["blocks"], emb_dim=cfg["emb_dim"])
    levels = len(cfg["mults"])
    state = big.state_dict()
    for key, value in small.state_dict().items():
        if key.startswith("dec."):   # old decoder level i is the big one's level i + 1
            idx, rest = key[4:].split(".", 1)
            key = f"dec.{int(idx) + 1}.{rest}"
        state[key] = value.clone()
    big.load_state_dict(state)
    width_new, width_old = cfg["base"] * mult, cfg["base"] * cfg["mults"][-1]
    with torch.no_grad():
        for i, block in enumerate(big.dec[0]):
            block.conv2.weight.zero_()
            block.conv2.bias.zero_()
            if i == 0:
                block.skip.weight.zero_()
                block.skip.bias.zero_()
                eye = torch.eye(width_old) * 2 ** (cfg["blocks"] / 2)
                block.skip.weight[:, width_new:, 0, 0] = eye
    assert len(big.enc) == levels + 1
    return big


def _restore(path: Path, net: UNet, ema: UNet, opt: torch.optim.Optimizer,
             dev: torch.device) -> tuple[int, float, list, dict]:
    """Load a training checkpoint into ``net``, ``ema``, ``opt`` and the torch RNG; returns
    (step, elapsed seconds, loss history, data statistics)."""
    ck = torch.load(path, map_location=dev, weights_only=True)
    if ck["config"] != net.config:
        raise ValueError(f"checkpoint {str(path)!r} was made with network config "
                         f"{ck['config']}, not {net.config}")
    net.load_state_dict(ck["model"])
    ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["torch_rng"].cpu())
    return ck["step"], ck["elapsed"], list(ck["history"]), ck["stats"]


def _warm_start(net: UNet, init_from: str) -> None:
    """Load the weights of the prior ``init_from`` into ``net``: same config, or that config
    less its last level (grown by :func:`grow_unet`)."""
    from diffrecon.priors import load as load_prior

    old = getattr(load_prior(init_from), "net", None)
    if old is not None and old.config != net.config and {
            **old.config, "mults": old.config["mults"] + net.config["mults"][-1:]
    } == net.config:
        old = grow_unet(old, net.config["mults"][-1])
    if old is None or old.config != net.config:
        raise ValueError(f"init_from {init_from!r} is not a network prior with config "
                         f"{net.config} (or that config less its last level)")
    net.load_state_dict(old.state_dict())


def batch_function(family: str | Sequence[str], crop: int, batch_size: int,
                   seed: int) -> tuple[Callable[[int], np.ndarray], int]:
    """(step -> batch, channels) for a named family or HDF5 file(s) with an ``image``
    dataset."""
    if isinstance(family, str) and family in data.FAMILIES:
        fn = functools.partial(data.make_batch, family, batch_size=batch_size, crop=crop,
                               seed=seed)
        return fn, data.family_channels(family)
    paths = [family] if isinstance(family, str | os.PathLike) else list(family)
    images = data.load_h5_images(paths)
    fn = functools.partial(data.h5_batch, images, batch_size=batch_size, crop=crop, seed=seed)
    return fn, images.shape[1]


def train_prior(out_dir: str | os.PathLike, *, family: str | Sequence[str] = "natural",
                name: str | None = None, crop: int = 64, batch_size: int = 16,
                steps: int = 10_000, lr: float = 2e-4, warmup: int = 200,
                lr_schedule: str = "cosine", ema_halflife_steps: float | None = None,
                ema_decay: float = 0.999, sigma_min: float = 0.002, sigma_max: float = 80.0,
                uniform_fraction: float = 0.25, base: int = 32, mults: tuple = (1, 2, 4),
                blocks: int = 2, init_from: str | None = None, checkpoint_every: int = 500,
                resume: bool = True, device: str = "auto", amp: bool = False, seed: int = 0,
                workers: int = 1, progress: bool = False,
                callback: Callable[[dict], None] | None = None, log_every: int = 50,
                stop_at: int | None = None) -> NetworkPrior:
    """Train a U-Net denoiser prior; returns the EMA prior (also in ``out_dir/prior.pt``).

    ``family``: a name of :data:`diffrecon.training.data.FAMILIES` or HDF5 path(s) each
    with an ``image`` dataset. ``out_dir/checkpoint.pt`` (model, EMA, optimizer, step, RNG
    state) is written atomically every ``checkpoint_every`` steps, with the EMA prior
    exported to ``out_dir/prior.pt``; with ``resume`` an existing checkpoint is continued.
    ``callback`` receives ``{'step', 'loss', 'lr', 'elapsed'}`` every ``log_every`` steps.
    ``amp`` enables bf16 autocast on CUDA only. ``stop_at`` ends this session after that
    step (with a checkpoint) without changing the schedule of ``steps``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
    if crop % 4:
        raise ValueError(f"crop must be a multiple of 4, got {crop}")
    dev = _resolve_device(device)
    batches, channels = batch_function(family, crop, batch_size, seed)
    name = name or out.name
    decay = 0.5 ** (1 / ema_halflife_steps) if ema_halflife_steps else ema_decay
    recipe = {"family": family if isinstance(family, str) else list(map(str, family)),
              "channels": channels, "crop": crop, "batch_size": batch_size, "steps": steps,
              "lr": lr, "warmup": warmup, "lr_schedule": lr_schedule, "ema_decay": decay,
              "sigma_min": sigma_min, "sigma_max": sigma_max, "p_mean": -1.2, "p_std": 1.2,
              "uniform_fraction": uniform_fraction, "seed": seed, "init_from": init_from,
              "optimizer": "Adam(betas=(0.9, 0.999))", "loss": "EDM weighted MSE"}

    torch.manual_seed(seed)
    net = UNet(channels, base=base, mults=tuple(mults), blocks=blocks).to(dev)
    ema = UNet(channels, base=base, mults=tuple(mults), blocks=blocks).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        start, elapsed, history, stats = _restore(ckpt_path, net, ema, opt, dev)
    else:
        if init_from is not None:
            _warm_start(net, init_from)
        ema.load_state_dict(net.state_dict())
        start, elapsed, history, stats = 0, 0.0, [], data_statistics(batches, channels)
    ema.requires_grad_(False)
    reference = data.INTENSITY_REFERENCE if family in data.FAMILIES else None
    recipe.update(stats)
    sigma_data, data_mean = stats["sigma_data"], stats["data_mean"]

    def wrap(module):
        return NetworkPrior(module, name=name, data_range=tuple(stats["data_range"]),
                            sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                            data_mean=data_mean, intensity_reference=reference,
                            autocast=amp and dev.type == "cuda")

    model, ema_prior = wrap(net), wrap(ema)

    def checkpoint(step):
        ck = {"config": net.config, "model": net.state_dict(), "ema": ema.state_dict(),
              "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
              "history": history, "stats": stats, "torch_rng": torch.get_rng_state(),
              "recipe": recipe}
        _atomic_save(ck, ckpt_path)
        tail = [h[1] for h in history[-5:]]
        extra = {"recipe": recipe, "steps": step, "wall_time_s": round(elapsed, 1),
                 "parameters": count_parameters(ema), "device": str(dev),
                 "final_loss": float(np.mean(tail)) if tail else None}
        save_network_prior(ema_prior, out / "prior.pt", extra)

    end = steps if stop_at is None else min(steps, stop_at)
    loader = torch.utils.data.DataLoader(
        _StepBatches(batches, start, end), batch_size=None, num_workers=workers,
        worker_init_fn=_one_thread if workers else None,
        prefetch_factor=4 if workers else None, pin_memory=dev.type == "cuda")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=name, dynamic_ncols=True)
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    gen = torch.Generator(device=dev)
    running = torch.zeros((), device=dev)
    t_last = time.perf_counter()
    try:
        for step, batch in loader:
            x = batch.to(dev, non_blocking=True)
            gen.manual_seed(seed * 1_000_003 + step)
            sigma = sample_sigmas(x.shape[0], gen, sigma_min=sigma_min, sigma_max=sigma_max,
                                  sigma_data=sigma_data, uniform_fraction=uniform_fraction)
            noise = torch.randn(x.shape, generator=gen, device=dev)
            weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, steps, warmup, lr_schedule)
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
            if done % log_every == 0 or done == end:
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
        if bar is not None:
            bar.close()
    if start >= end and not (out / "prior.pt").is_file():
        checkpoint(start)
    return load_network_prior(out / "prior.pt", map_location=dev)
