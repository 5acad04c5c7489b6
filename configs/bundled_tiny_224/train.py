"""Training script that produced the bundled tiny model (see README.md beside it for the exact command)."""
import math
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dust3r_ns.model.checkpoint import save_hf
from dust3r_ns.model.network import AsymmetricCroCo3DStereo
from dust3r_ns.synth import make_scene, random_pair, render

H = W = 224


class Pairs(Dataset):
    def __init__(self, n, seed):
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        sc = make_scene(int(rng.integers(1 << 30)))
        c2w, K = random_pair(sc, rng, H, W, baseline_deg=(5, 70))
        out = []
        w2c0 = np.linalg.inv(c2w[0])
        for k in range(2):
            r = render(sc, c2w[k], K[k], H, W, points=True, shadows=bool(rng.random() < 0.7))
            p = r["pts3d"].reshape(-1, 3).astype(np.float64)
            p = (p @ w2c0[:3, :3].T + w2c0[:3, 3]).reshape(H, W, 3).astype(np.float32)
            img = torch.from_numpy(r["rgb"].copy()).permute(2, 0, 1).float() / 255 * 2 - 1
            out += [img, torch.from_numpy(p), torch.from_numpy(r["valid"].copy())]
        return out


def norm_factor(p1, p2, v1, v2):
    d = torch.cat([(p1.norm(dim=-1) * v1).flatten(1), (p2.norm(dim=-1) * v2).flatten(1)], 1).sum(1)
    n = torch.cat([v1.flatten(1), v2.flatten(1)], 1).float().sum(1).clamp(min=1)
    return (d / n).clamp(min=1e-8)[:, None, None, None]


def loss_fn(pred1, pred2, g1, g2, v1, v2, alpha=0.2):
    p1, p2 = pred1["pts3d"], pred2["pts3d_in_other_view"]
    pf = norm_factor(p1, p2, v1, v2)
    gf = norm_factor(g1, g2, v1, v2)
    l1 = (p1 / pf - g1 / gf).norm(dim=-1)
    l2 = (p2 / pf - g2 / gf).norm(dim=-1)
    c1, c2 = pred1["conf"], pred2["conf"]
    t1 = (c1 * l1 - alpha * c1.log())[v1].mean()
    t2 = (c2 * l2 - alpha * c2.log())[v2].mean()
    return t1 + t2, (l1[v1].mean() + l2[v2].mean()).item() / 2


CFG = dict(img_size=(224, 224), head_type="linear", enc_embed_dim=128, enc_depth=4, enc_num_heads=4,
           dec_embed_dim=96, dec_depth=2, dec_num_heads=4, landscape_only=False)


def main():
    minutes, out = float(sys.argv[1]), sys.argv[2]
    dev = sys.argv[3] if len(sys.argv) > 3 else "cuda"
    bs = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    workers = int(sys.argv[5]) if len(sys.argv) > 5 else 15
    torch.manual_seed(0)
    model = AsymmetricCroCo3DStereo(**CFG).to(dev)
    print("params", sum(p.numel() for p in model.parameters()) / 1e6, "M", flush=True)
    dl = DataLoader(Pairs(10**7, 1), batch_size=bs, num_workers=workers, persistent_workers=True, prefetch_factor=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05)
    t0, step, budget, warm = time.time(), 0, minutes * 60, 200
    for batch in dl:
        i1, g1, v1, i2, g2, v2 = [b.to(dev, non_blocking=True) for b in batch]
        el = time.time() - t0
        if el > budget:
            break
        lr = 3e-4 * min(1, (step + 1) / warm) * (0.5 * (1 + math.cos(math.pi * el / budget)) * 0.97 + 0.03)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            p1, p2 = model(dict(img=i1), dict(img=i2))
        loss, reg = loss_fn(p1, p2, g1, g2, v1, v2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            print(f"step {step} t {el:.0f}s loss {loss.item():.4f} regr {reg:.4f} lr {lr:.2e}", flush=True)
        if step % 200 == 0 and step:
            save_hf(model, out)
        step += 1
    model = model.float().cpu()
    save_hf(model, out)
    print("saved", out, step, "steps", flush=True)


if __name__ == "__main__":
    main()
