"""Train the demo segmenter on procedural scenes and their per-pixel labels.

    python -m demo.train_segmenter --config tiny|full --out DIR [--device auto|cpu|cuda]

Training images are degraded at random (blur, noise, colour shifts) so that the
segmenter also reads the softer, slightly off-colour images the generator makes.
Training uses scene seeds from TRAIN_SEED_BASE on; the held-out evaluation uses
scene seeds 0 .. eval_images - 1 (never trained on).

Writes ``segmenter.safetensors`` (architecture "demo-segmenter") and ``segmenter.json``
(config, iterations, time, device, per-class IoU on the held-out scenes).
"""
import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from demo.artifacts import device_name, pick_device, save_weights
from demo.scenes import render_scenes
from demo.segmenter import Segmenter, confusion, iou_from_confusion

TRAIN_SEED_BASE = 100_000_000


@dataclass
class SegmenterTrainConfig:
    resolution: int = 64
    channels: tuple = (32, 64, 128)
    batch_size: int = 64
    iterations: int = 4000
    lr: float = 0.003
    eval_images: int = 1000
    log_every: int = 250
    seed: int = 0


CONFIGS = {
    "full": SegmenterTrainConfig(),
    "tiny": SegmenterTrainConfig(resolution=32, channels=(8, 16, 32), batch_size=8, iterations=20,
                                 eval_images=16, log_every=10),
}


def degrade(images, gen):
    """Random blur, colour gain/offset and noise per image, images in [-1, 1]."""
    n = len(images)
    device = images.device
    sigma = torch.rand(n, generator=gen).to(device) * 1.2
    r = torch.arange(-2, 3, device=device, dtype=images.dtype)
    k = torch.exp(-r[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)  # [n, 5]
    x = images.permute(1, 0, 2, 3).reshape(1, 3 * n, *images.shape[2:])  # depthwise, one kernel per image
    kk = k.repeat_interleave(3, 0)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kk[:, None, None, :], groups=3 * n)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kk[:, None, :, None], groups=3 * n)
    x = x.reshape(3, n, *images.shape[2:]).permute(1, 0, 2, 3)
    gain = 1 + 0.15 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    offset = 0.1 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    noise = 0.06 * torch.rand(n, 1, 1, 1, generator=gen)
    x = x * gain.to(device) + offset.to(device)
    x = x + noise.to(device) * torch.randn(x.shape, generator=gen).to(device)
    return x.clamp(-1, 1)


@torch.no_grad()
def evaluate(model, n_images, resolution, device, batch_size=100):
    """Per-class IoU on held-out scene seeds 0 .. n_images - 1."""
    was_training = model.training
    model.eval()
    conf = 0
    for start in range(0, n_images, batch_size):
        images, labels = render_scenes(range(start, min(start + batch_size, n_images)), resolution, device)
        conf = conf + confusion(model(images).argmax(1), labels)
    model.train(was_training)
    return iou_from_confusion(conf)


def train(cfg: SegmenterTrainConfig, out_dir, device, log=print):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Segmenter(cfg.channels).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.iterations, pct_start=0.1)
    t0 = time.time()
    loss_sum = 0.0
    for it in range(cfg.iterations):
        seeds = range(TRAIN_SEED_BASE + it * cfg.batch_size, TRAIN_SEED_BASE + (it + 1) * cfg.batch_size)
        images, labels = render_scenes(seeds, cfg.resolution, device)
        # Half of each batch degraded, half clean.
        half = cfg.batch_size // 2
        images = torch.cat([degrade(images[:half], gen), images[half:]])
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item()
        if (it + 1) % cfg.log_every == 0:
            log(f"it {it + 1} {time.time() - t0:.0f}s loss={loss_sum / cfg.log_every:.4f}")
            loss_sum = 0.0
    seconds = time.time() - t0
    iou = evaluate(model, cfg.eval_images, cfg.resolution, device)
    log(f"held-out IoU on {cfg.eval_images} scenes: {iou}")
    config = {"channels": list(cfg.channels)}
    save_weights(model, out_dir / "segmenter.safetensors", "demo-segmenter", config)
    record = {
        "architecture": "demo-segmenter", "config": config, "train_config": asdict(cfg),
        "iterations": cfg.iterations, "seconds": round(seconds, 1), "device": device_name(device),
        "final": {"loss": round(loss.item(), 4), "heldout_images": cfg.eval_images,
                  "heldout_seeds": f"0-{cfg.eval_images - 1}", "iou": iou},
    }
    (out_dir / "segmenter.json").write_text(json.dumps(record, indent=2) + "\n")
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--iterations", type=int, help="override the config's iteration count")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    if args.iterations is not None:
        cfg = replace(cfg, iterations=args.iterations)
    train(cfg, args.out, pick_device(args.device))


if __name__ == "__main__":
    main()
