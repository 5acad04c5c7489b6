"""Render the bundled example: one synthetic room from 5 cameras on a moderate arc at 384x512.

`python -m dust3r_ns.synth.make_examples [--out examples/synthetic_room] [--seed 3]` writes view_00.png ..
view_04.png and cameras.json (GT OpenCV camera-to-world `c2w`, intrinsics `K` in pixel coordinates, image size).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import atomic_write
from .cameras import camera_path
from .render import render_views
from .scene import make_scene


def make_examples(out: str | Path = "examples/synthetic_room", seed: int = 3, n: int = 5, H: int = 384,
                  W: int = 512) -> list[Path]:
    """Render and save the example views; returns the written paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scene = make_scene(seed)
    c2w, K = camera_path(scene, n, baseline="moderate", seed=seed, H=H, W=W)
    views = render_views(scene, c2w, K, H, W)
    paths = []
    for k, v in enumerate(views):
        p = out / f"view_{k:02d}.png"
        atomic_write(p, lambda tmp, rgb=v["rgb"]: Image.fromarray(rgb).save(tmp, format="PNG", optimize=True),
                     "example view")
        paths.append(p)
    meta = dict(convention="OpenCV camera-to-world (x right, y down, z forward), world up +z; K in pixels, "
                           "pixel (u, v) has continuous coordinate (u, v)",
                seed=seed, height=H, width=W, images=[p.name for p in paths],
                c2w=np.asarray(c2w).tolist(), K=np.asarray(K).tolist())
    js = out / "cameras.json"
    atomic_write(js, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)), "cameras.json")
    return paths + [js]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="examples/synthetic_room")
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    for p in make_examples(a.out, a.seed):
        print(f"{p}  {p.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
