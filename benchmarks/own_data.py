"""Own data and diffusers interop (issue 18): what reading a folder costs, how exactly an
exported pipeline reproduces fedscore's sampler, and what a pretrained start buys.

1. Reading: 2,000 real digits (mnist5k's first 2,000, 28x28 grey) written as PNGs and as
   one .npz, read by `fedscore.data.load` the way a run reads them: first read (decode),
   second read (the in-process cache), and at image_size 14 (block means) and 16
   (antialiased bilinear).
2. Export exactness: RUN (a trained diffusers-kind run, default runs/own-shapes from
   `fedscore train --config configs/own-shapes.yaml`) exported; `DDPMPipeline` vs
   fedscore's ancestral sampler (clipped like DDPM) on the same noise and timesteps, for
   10, 100 and 1000 steps: max |difference| of the output images (in [0, 1]) and the
   seconds of each, side by side.
3. Pretrained in: federated fine-tuning of RUN's config for --rounds rounds started from
   the exported U-Net (`model.pretrained`) vs from the seeded init: held-out eq. 9 and the
   training loss after the last round.

Usage: python benchmarks/own_data.py [--run runs/own-shapes] [--rounds 5] [--skip-finetune]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedscore import data as datasets
from fedscore import diffusion
from fedscore.config import DataConfig, read_yaml
from fedscore.data import own
from fedscore.export import ddpm_times, export_diffusers
from fedscore.runs.evaluate import load_model


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def reading(tmp: Path, n: int = 2000) -> None:
    x, y = datasets.load("mnist5k", split="all")
    x, y = x[:n], y[:n]
    pixels = ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for i, (img, label) in enumerate(zip(pixels, y.tolist())):
        folder = tmp / "folder" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    np.savez(tmp / "digits.npz", x=pixels, y=y.numpy())
    print(f"\n## Reading {n} images (28x28 grey PNGs / one .npz)\n")
    print("| source | first read (s) | images/s | cached read (s) |")
    print("|---|---:|---:|---:|")
    for label, cfg in [
        ("folder", DataConfig(name="folder", path=str(tmp / "folder"))),
        ("folder, image_size 14 (block means)",
         DataConfig(name="folder", path=str(tmp / "folder"), image_size=14)),
        ("folder, image_size 16 (bilinear)",
         DataConfig(name="folder", path=str(tmp / "folder"), image_size=16)),
        ("arrays (.npz)", DataConfig(name="arrays", path=str(tmp / "digits.npz"))),
    ]:
        own.clear_cache()
        (imgs, _), first = timed(lambda c=cfg: datasets.load(c, split="all"))
        _, again = timed(lambda c=cfg: datasets.load(c, split="all"))
        print(f"| {label} | {first:.2f} | {len(imgs) / first:,.0f} | {again:.3f} |")


def exactness(run: Path, tmp: Path) -> None:
    import diffusers

    out = export_diffusers(run, tmp / "pipe")
    pipe = diffusers.DDPMPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    net, cfg = load_model(run)
    shape = tuple(pipe.unet.config[k] for k in ("in_channels", "sample_size", "sample_size"))
    score = diffusion.clip_denoised(diffusion.score_fn_of(lambda x, t: net(x, t), "eps"))
    print(f"\n## Export exactness: {run} -> DDPMPipeline, 8 images, same noise\n")
    print("| steps | max abs diff (images in [0, 1]) | pipeline (s) | fedscore (s) |")
    print("|---:|---:|---:|---:|")
    for steps in (10, 100, 1000):
        with torch.no_grad():
            images, t_pipe = timed(lambda s=steps: pipe(
                batch_size=8, generator=torch.Generator().manual_seed(0),
                num_inference_steps=s, output_type="np").images)
        pipe.scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(0)
        ours, t_ours = timed(lambda g=g: diffusion.sample(
            score, diffusion.prior((8, *shape), g), ddpm_times(pipe.scheduler.timesteps),
            "ancestral", g))
        ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        print(f"| {steps} | {np.abs(images - ours).max():.2e} | {t_pipe:.1f} | {t_ours:.1f} |")


def finetune(run: Path, tmp: Path, rounds: int) -> None:
    from fedscore.config import load_config
    from fedscore.runs.federated import train_federated

    pipe = tmp / "pipe" if (tmp / "pipe").is_dir() else export_diffusers(run, tmp / "pipe")
    raw = read_yaml(run / "config.yaml", "run config")
    print(f"\n## Pretrained in: {rounds} federated rounds of {run.name}'s config\n")
    print("| start | held-out eq. 9 | training loss | seconds |")
    print("|---|---:|---:|---:|")
    for label, pretrained in (("seeded init", None), (f"pretrained ({run.name})", str(pipe))):
        model = {**raw["model"], "pretrained": pretrained}
        if pretrained:  # the folder fixes the architecture: only adapter options remain
            model["options"] = {k: v for k, v in raw["model"]["options"].items()
                                if k in ("T", "time_map", "delta", "label_encoding")}
        cfg = load_config(None, **{**raw, "name": f"ft-{'pre' if pretrained else 'init'}",
                                   "out_dir": str(tmp / "runs"), "model": model,
                                   "federation": {**raw["federation"], "rounds": rounds,
                                                  "eval_every": rounds}})
        result, seconds = timed(lambda c=cfg: train_federated(c, progress=False))
        print(f"| {label} | {result.eq9:.1f} | {result.final_loss:.4f} | {seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/own-shapes"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-finetune", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reading(tmp)
        if not (args.run / "model.safetensors").is_file():
            print(f"\n{args.run} holds no trained model: train it with `fedscore train "
                  "--config configs/own-shapes.yaml`, then rerun for parts 2-3")
            return
        exactness(args.run, tmp)
        if not args.skip_finetune:
            finetune(args.run, tmp, args.rounds)


if __name__ == "__main__":
    main()
