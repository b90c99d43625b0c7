"""How fast does the cpu_tiny LinearSR learn on CPU? A plain torch loop (no Ray, no DeepSpeed).

Trains on random 96x96 HR crops (flips) of four real photos (skimage astronaut, coffee,
chelsea; sklearn china), LR = antialiased bicubic x1/4 quantised to 8 bits (`bicubic_down`),
and evaluates the 1-NFE output on two held-out photos (skimage rocket, sklearn flower) by
PSNR-Y with the border cropped (`trainer.quality.psnr_y`) beside bicubic on the same images.

    .venv/bin/python scripts/learn_cpu_tiny.py --steps 1500 --shift 3 --ema 0.995 [--t1-fraction 0.1]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import time

import numpy as np
import torch

from linearsr.data.degrade import bicubic_down, modcrop
from linearsr.model.config import ModelConfig
from linearsr.model.flow import FlowConfig
from linearsr.model.network import LinearSR
from linearsr.model.sampler import sample
from linearsr.trainer.quality import psnr_y


def photos() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255

    china, flower = load_sample_images().images
    train = [t(skd.astronaut()), t(skd.coffee()), t(skd.chelsea()), t(china)]
    return train, {"rocket": modcrop(t(skd.rocket()), 4), "flower": modcrop(t(flower), 4)}


def batch(train: list[torch.Tensor], n: int, crop: int, rng: random.Random) -> torch.Tensor:
    out = []
    for _ in range(n):
        img = rng.choice(train)
        y, x = rng.randrange(img.shape[1] - crop), rng.randrange(img.shape[2] - crop)
        c = img[:, y : y + crop, x : x + crop]
        out.append(c.flip(-1) if rng.random() < 0.5 else c)
    return torch.stack(out)


@torch.no_grad()
def evaluate(model: LinearSR, held: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    for name, hr in held.items():
        lr = bicubic_down(hr, 4)
        sr = sample(model, lr[None], steps=1).image[0]
        bic = model.upsample(lr[None])[0]
        out[name] = {"model": round(psnr_y(sr, hr, 4), 3), "bicubic": round(psnr_y(bic, hr, 4), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--shift", type=float, default=3.0, help="flow.shift of the training t distribution")
    ap.add_argument("--t1-fraction", type=float, default=0.0, help="flow.t1_fraction: the share of each batch at t = 1")
    ap.add_argument("--ema", type=float, default=0.995, help="EMA decay of the evaluated weights (0 = raw weights)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="{}", help='JSON overrides of the cpu_tiny preset, e.g. \'{"width": 96}\'')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    train, held = photos()
    model = LinearSR(ModelConfig.preset("cpu_tiny", **json.loads(args.model)))
    ema = copy.deepcopy(model) if args.ema else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    flow = FlowConfig(shift=args.shift, t1_fraction=args.t1_fraction)
    print(f"cpu_tiny: {model.num_params() / 1e6:.2f}M parameters; {vars(args)}")
    times, losses = [], []
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        hr = batch(train, args.batch, args.crop, rng)
        loss = model.loss(hr, bicubic_down(hr, 4), [[]] * args.batch, flow.sample_t(args.batch)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # cosine to lr/10
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 50) * decay
        opt.step()
        if args.ema:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - args.ema)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            res = evaluate(ema.eval(), held)
            gains = {k: round(v["model"] - v["bicubic"], 2) for k, v in res.items()}
            print(f"step {step:5d}  loss {statistics.mean(losses[-50:]):.3f}  {statistics.median(times[-50:]):.3f} s/step  "
                  f"PSNR-Y {json.dumps(res)}  gain dB {gains}", flush=True)
            model.train()


if __name__ == "__main__":
    main()
