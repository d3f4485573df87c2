"""Train the demo generator on procedural scenes.

    python -m demo.train_generator --config tiny|full --out DIR [--resume CKPT] [--device auto|cpu|cuda]

Non-saturating logistic GAN loss with a lazy R1 penalty on the discriminator, Adam
(beta1 = 0) and an exponential moving average of the generator weights; the EMA
generator is what gets shipped. Scenes are rendered on the training device, from
scene seeds TRAIN_SEED_BASE + i (evaluation uses scene seeds below 1,000,000).

Writes into DIR:
- ``generator.safetensors``: the EMA generator (architecture "demo-gan");
- ``generator.json``: the training record (config, iterations, time, device, figures);
- ``train_state.safetensors``: G, D, EMA and both optimizers, for ``--resume``;
- ``samples.png``: the EMA generator on latent seeds 0-63.
"""
import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file

from demo.discriminator import Discriminator
from demo.generator import Generator
from demo.scenes import render_scenes
from demo.artifacts import device_name, pick_device, save_grid, save_weights
from rewriting.seeds import latents

TRAIN_SEED_BASE = 1_000_000


@dataclass
class TrainConfig:
    resolution: int = 64
    channels: tuple = (256, 256, 128, 64, 32)
    z_dim: int = 128
    batch_size: int = 64
    iterations: int = 30_000
    max_seconds: float = 1e9  # stop early (and save) after this long in one run
    lr: float = 0.002
    betas: tuple = (0.0, 0.99)
    r1_gamma: float = 0.5
    r1_every: int = 4  # lazy regularization: penalize every k steps, scaled by k
    ema_decay: float = 0.999
    diversity: float = 0.0  # weight of the mode-seeking term (0: off; the full config, as shipped: 1)
    render_batches: int = 0  # batches of scenes rendered per call (0: by device, see scene_batches)
    checkpoint_every: int = 2000
    log_every: int = 200
    seed: int = 0

    def __post_init__(self):
        # scene_batches would loop forever drawing no scenes.
        if self.render_batches < 0:
            raise ValueError(f"render_batches must be at least 0 (0: by device), got {self.render_batches}")

    def generator_config(self):
        return {"z_dim": self.z_dim, "resolution": self.resolution, "channels": list(self.channels)}


CONFIGS = {
    # The shipped generator: without the mode-seeking term the run collapsed (docs/demo.md).
    "full": TrainConfig(diversity=1.0),
    # Runs end to end on a CPU in seconds: used by the tests.
    "tiny": TrainConfig(resolution=16, channels=(32, 32, 16), z_dim=16, batch_size=8, iterations=30,
                        ema_decay=0.9, checkpoint_every=20, log_every=10),
}


def save_state(path, G, D, G_ema, opt_g, opt_d, iteration, seconds, cfg):
    """Everything a resume needs, as one safetensors file (no pickles)."""
    tensors = {}
    for prefix, module in (("G.", G), ("D.", D), ("G_ema.", G_ema)):
        tensors.update({prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    for prefix, opt in (("opt_g.", opt_g), ("opt_d.", opt_d)):
        for idx, state in opt.state_dict()["state"].items():
            for k, v in state.items():
                tensors[f"{prefix}{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    meta = {"iteration": str(iteration), "seconds": str(seconds), "config": json.dumps(asdict(cfg))}
    save_file(tensors, str(path), metadata=meta)


def load_state(path, G, D, G_ema, opt_g, opt_d):
    """Restore what save_state wrote; returns (iteration, seconds, config dict)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    for prefix, module in (("G.", G), ("D.", D), ("G_ema.", G_ema)):
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for prefix, opt in (("opt_g.", opt_g), ("opt_d.", opt_d)):
        sd = opt.state_dict()
        device = next(iter(opt.param_groups[0]["params"])).device
        for key, v in tensors.items():
            if key.startswith(prefix):
                idx, name = key[len(prefix):].split(".", 1)
                # Adam keeps 'step' on the CPU, moments beside the parameter.
                sd["state"].setdefault(int(idx), {})[name] = v if name == "step" else v.to(device)
        opt.load_state_dict(sd)
    return int(meta["iteration"]), float(meta["seconds"]), json.loads(meta["config"])


def r1_penalty(D, reals):
    reals = reals.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(D(reals).sum(), reals, create_graph=True)
    return grad.pow(2).sum((1, 2, 3)).mean()


def latent_spread(fakes, z):
    """Image distance over latent distance between the batch's two halves (Mao et al. 2019).

    Near 0 when distinct latents draw near-identical images: the mode collapse measured
    in the generator shipped before session 16 (docs/demo.md). Logged always;
    ``diversity`` > 0 adds ``diversity / spread`` to the generator's loss (MSGAN's
    mode-seeking term).
    """
    half = len(z) // 2
    images = (fakes[:half] - fakes[half:2 * half]).abs().mean()
    latents = (z[:half] - z[half:2 * half]).abs().mean()
    return images / latents


def scene_batches(first_iteration, cfg, device):
    """The training scenes, one batch per iteration from ``first_iteration`` on, endlessly.

    Iteration i trains on scene seeds TRAIN_SEED_BASE + i * batch_size onwards, however
    many batches one ``render_scenes`` call draws (a scene depends on its seed alone, and
    the images are bit-equal either way). On CUDA a call is about 1,300 small kernels
    (as many as the generator's and discriminator's steps together) and a few host
    waits (uploads of uniforms and palettes), whatever its size, so 16 batches are
    drawn at once there; on a CPU one at a time, as larger calls ran slower per scene
    (1,024 scenes: 2.9 s at once, 2.1 s in 16 calls).
    """
    chunk = cfg.render_batches or (16 if device.type == "cuda" else 1)
    it = first_iteration
    while True:
        seeds = range(TRAIN_SEED_BASE + it * cfg.batch_size, TRAIN_SEED_BASE + (it + chunk) * cfg.batch_size)
        images, _ = render_scenes(seeds, cfg.resolution, device)
        yield from images.split(cfg.batch_size)
        it += chunk


def train(cfg: TrainConfig, out_dir, device, resume=None, init_generator=None, log=print):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    G = Generator(**cfg.generator_config()).to(device)
    D = Discriminator(cfg.resolution, cfg.channels).to(device)
    G_ema = Generator(**cfg.generator_config()).to(device).eval()
    G_ema.load_state_dict(G.state_dict())
    G_ema.requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    # Lazy R1: the optimizer's moments see the penalty every r1_every steps; correct lr and betas.
    c = cfg.r1_every / (cfg.r1_every + 1)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr * c, betas=(cfg.betas[0] ** c, cfg.betas[1] ** c))
    start, seconds = 0, 0.0
    if resume:
        start, seconds, _ = load_state(resume, G, D, G_ema, opt_g, opt_d)
        log(f"resumed from {resume} at iteration {start}")
    elif init_generator:
        # Warm start from shipped (EMA) weights alone: a fresh discriminator and optimizers.
        with safe_open(str(init_generator), framework="pt") as f:
            meta = f.metadata()
        start, seconds = int(meta.get("iterations", 0)), float(meta.get("seconds", 0))
        weights = load_file(str(init_generator))
        G.load_state_dict(weights)
        G_ema.load_state_dict(weights)
        log(f"generator initialized from {init_generator} (iteration {start}); discriminator fresh")

    sample_z = latents(range(64), cfg.z_dim).to(device)
    t0 = time.time() - seconds  # training time across resumes
    run_start = time.time()
    it = start
    figures = {}
    # Summed on the device between log steps: an .item() each step would make the host wait.
    sums = {"loss_d": 0.0, "loss_g": 0.0, "r1": 0.0, "d_real": 0.0, "d_fake": 0.0, "spread": 0.0}
    counts = {k: 0 for k in sums}

    def checkpoint(final=False):
        elapsed = time.time() - t0
        save_state(out_dir / "train_state.safetensors", G, D, G_ema, opt_g, opt_d, it, elapsed, cfg)
        record = {
            "architecture": "demo-gan", "config": cfg.generator_config(), "train_config": asdict(cfg),
            "iterations": it, "seconds": round(elapsed, 1), "device": device_name(device),
            "images_seen": it * cfg.batch_size, "final": figures, "finished": final,
        }
        save_weights(G_ema, out_dir / "generator.safetensors", "demo-gan", cfg.generator_config(),
                     extra={"iterations": str(it), "seconds": str(round(elapsed, 1))})
        (out_dir / "generator.json").write_text(json.dumps(record, indent=2) + "\n")
        with torch.no_grad():
            save_grid(G_ema(sample_z).cpu(), out_dir / "samples.png", nrow=8)

    scenes = scene_batches(it, cfg, device)
    while it < cfg.iterations and time.time() - run_start < cfg.max_seconds:
        reals = next(scenes)
        z = torch.randn(cfg.batch_size, cfg.z_dim, device=device)

        # Discriminator step.
        with torch.no_grad():
            fakes = G(z)
        d_real, d_fake = D(reals), D(fakes)
        loss_d = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        if it % cfg.r1_every == 0:
            r1 = r1_penalty(D, reals)
            (cfg.r1_gamma / 2 * r1 * cfg.r1_every).backward()
            sums["r1"] += r1.detach()
            counts["r1"] += 1
        opt_d.step()

        # Generator step.
        fakes = G(z)
        loss_g = F.softplus(-D(fakes)).mean()
        if cfg.diversity:
            loss_g = loss_g + cfg.diversity / (latent_spread(fakes, z) + 1e-5)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - cfg.ema_decay)
        it += 1
        if it % cfg.log_every == 0 or it == cfg.iterations:
            for k, v in (("loss_d", loss_d), ("loss_g", loss_g), ("d_real", d_real.mean()), ("d_fake", d_fake.mean()),
                         ("spread", latent_spread(fakes.detach(), z))):
                sums[k] += v.detach()
                counts[k] += 1
            figures = {k: round(float(sums[k]) / max(counts[k], 1), 4) for k in sums}
            sums = {k: 0.0 for k in sums}
            counts = {k: 0 for k in counts}
            log(f"it {it} {time.time() - t0:.0f}s " + " ".join(f"{k}={v}" for k, v in figures.items()))
        if it % cfg.checkpoint_every == 0:
            checkpoint()
    checkpoint(final=True)
    return G_ema


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resume", help="a train_state.safetensors to continue from")
    parser.add_argument("--init-generator", help="a generator.safetensors to start G from (fresh D)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--iterations", type=int, help="override the config's iteration count")
    parser.add_argument("--batch-size", type=int, help="override the config's batch size")
    parser.add_argument("--max-seconds", type=float, help="stop (and save) after this much wall-clock time")
    parser.add_argument("--r1-gamma", type=float, help="override the config's R1 weight")
    parser.add_argument("--diversity", type=float, help="weight of the mode-seeking term (default: the config's; full 1, tiny 0)")
    parser.add_argument("--render-batches", type=int,
                        help="batches of scenes rendered per call (default: 16 on CUDA, 1 on a CPU)")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    if args.iterations is not None:
        cfg = replace(cfg, iterations=args.iterations)
    if args.batch_size is not None:
        cfg = replace(cfg, batch_size=args.batch_size)
    if args.max_seconds is not None:
        cfg = replace(cfg, max_seconds=args.max_seconds)
    if args.r1_gamma is not None:
        cfg = replace(cfg, r1_gamma=args.r1_gamma)
    if args.diversity is not None:
        cfg = replace(cfg, diversity=args.diversity)
    if args.render_batches is not None:
        if args.render_batches < 1:
            parser.error("--render-batches must be at least 1")
        cfg = replace(cfg, render_batches=args.render_batches)
    train(cfg, args.out, pick_device(args.device), resume=args.resume, init_generator=args.init_generator)


if __name__ == "__main__":
    main()
