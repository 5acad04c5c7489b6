"""The `dust3r-ns` command line: `infer`, `reconstruct`, `export`, `train`, `bench inference`, `bench align`.

Each subcommand is a dataclass config parsed by tyro (every field has a `--flag`) plus a `run(cfg)` function.
Errors that come from bad input (files, options) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import tyro

DEFAULT_WEIGHTS = Path(__file__).parent / "weights"


def default_model_source() -> str:
    """The bundled model (trained on synthetic scenes only) when present."""
    found = sorted(p for p in DEFAULT_WEIGHTS.glob("*") if (p / "config.json").exists())
    if not found:
        raise ValueError("no model given and no bundled model installed; pass --model with a .pth file, a Hugging "
                         "Face folder (config.json + model.safetensors) or a hub name such as "
                         "naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt")
    print(f"note: using the bundled model {found[0].name}: it only knows synthetic scenes; for real photos pass "
          "--model naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt (or a downloaded .pth / HF folder)", file=sys.stderr)
    return str(found[0])


def load(model: Optional[str], device: str):
    from dust3r_ns.model.checkpoint import load_model

    return load_model(model or default_model_source(), device=device)


def image_size_of(net) -> int:
    """Preprocessing size implied by the model: 224 for 224 models, else 512."""
    size = net.config["img_size"]
    side = max(size) if isinstance(size, (tuple, list)) else int(size)
    return 224 if side <= 224 else 512


@dataclass
class InferConfig:
    """Run DUSt3R on every pair of a scene graph and save the pairwise point maps (no alignment)."""

    images: tyro.conf.Positional[list[Path]]
    """Image files or one folder of images."""
    out: Path = Path("pairs.npz")
    """Output file with the pairwise predictions (reference structure, numpy arrays)."""
    model: Optional[str] = None
    """Checkpoint: .pth, Hugging Face folder, or hub name; default: the bundled model."""
    size: Optional[int] = None
    """Network image size (224 or 512); default: from the model."""
    scene_graph: Optional[str] = None
    """complete, swin-k, logwin-k, oneref-k (+ -noncyclic); default: chosen from the number of images."""
    device: str = "cpu"
    """Torch device for the network."""
    batch_size: int = 8
    """Pairs per decoder batch (bounds memory)."""
    amp: Optional[Literal["bf16", "fp16"]] = None
    """Mixed precision for encoder/decoder (heads stay float32); default float32."""


def save_pairs(output: dict, path: Path) -> None:
    """Atomically write the pair-inference output as a flat .npz (`view1.idx`, `pred2.conf`, ...)."""
    import os
    import tempfile

    import numpy as np
    import torch

    flat = {}
    for part in ("view1", "view2", "pred1", "pred2"):
        for k, v in output[part].items():
            if k in ("img", "rgb"):
                continue
            if isinstance(v, torch.Tensor):
                flat[f"{part}.{k}"] = v.numpy()
            elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                for i, t in enumerate(v):
                    flat[f"{part}.{k}.{i}"] = t.numpy()
            elif isinstance(v, list) and v and isinstance(v[0], (int, str)):
                flat[f"{part}.{k}"] = np.asarray(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **flat)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_pairs(images, model, size, scene_graph, device, batch_size, amp):
    """Load images, build the pair graph, run the engine. Returns (views, output)."""
    from dust3r_ns.images import load_images
    from dust3r_ns.inference import inference
    from dust3r_ns.pairs import default_scene_graph, make_pairs

    net = load(model, device)
    views = load_images(images if len(images) != 1 else images[0], size=size or image_size_of(net))
    graph = scene_graph or default_scene_graph(len(views))
    pairs = make_pairs(views, scene_graph=graph, symmetrize=True)
    print(f"{len(views)} images, scene graph {graph}: {len(pairs)} ordered pairs", file=sys.stderr)
    return views, inference(pairs, net, device=device, batch_size=batch_size, amp=amp, verbose=True)


def run_infer(cfg: InferConfig) -> dict:
    t0 = time.perf_counter()
    _, output = run_pairs(cfg.images, cfg.model, cfg.size, cfg.scene_graph, cfg.device, cfg.batch_size, cfg.amp)
    save_pairs(output, cfg.out)
    conf = output["pred1"]["conf"]
    mean_conf = float(conf.mean()) if hasattr(conf, "mean") else float(sum(c.mean() for c in conf) / len(conf))
    print(f"wrote {cfg.out}: {len(output['view1']['idx'])} pairs, mean confidence {mean_conf:.2f}, "
          f"{time.perf_counter() - t0:.1f} s")
    return output


def _bench(argv: list[str]):
    if not argv or argv[0] not in ("inference", "align", "model"):
        raise SystemExit("usage: dust3r-ns bench {inference|align|model} [--help]")
    if argv[0] == "inference":
        from dust3r_ns.bench.inference import InferenceBenchConfig as Config, run
    elif argv[0] == "align":
        from dust3r_ns.bench.align import AlignBenchConfig as Config, run  # type: ignore[no-redef]
    else:
        from dust3r_ns.bench.model_eval import ModelEvalConfig as Config, run  # type: ignore[no-redef]
    run(tyro.cli(Config, args=argv[1:], prog=f"dust3r-ns bench {argv[0]}"))


def _commands() -> dict:
    cmds = {"infer": (InferConfig, run_infer)}
    try:
        from dust3r_ns.reconstruct import ReconstructConfig, run as run_reconstruct

        cmds["reconstruct"] = (ReconstructConfig, run_reconstruct)
    except ImportError:
        pass
    from dust3r_ns.export.cli import ExportConfig, run as run_export

    cmds["export"] = (ExportConfig, run_export)
    return cmds


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = _commands()
    usage = "usage: dust3r-ns {" + ",".join(list(cmds) + ["train", "bench"]) + "} [--help]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    try:
        if name == "bench":
            _bench(rest)
        elif name == "train":  # presets (--preset NAME) are applied before the command-line fields
            from dust3r_ns.train.loop import main as train_main

            train_main(rest)
        elif name in cmds:
            cfg_cls, fn = cmds[name]
            fn(tyro.cli(cfg_cls, args=rest, prog=f"dust3r-ns {name}"))
        else:
            print(f"dust3r-ns: unknown command {name!r}; {usage}", file=sys.stderr)
            return 2
    except (ValueError, OSError) as e:
        print(f"dust3r-ns {name}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
