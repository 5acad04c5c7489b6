"""The `dust3r-ns` command line: `infer`, `reconstruct`, `export`, `train`, `bench {inference,align,model,tracks}`.

Each subcommand is a dataclass config parsed by tyro (every field has a `--flag`) plus a `run(cfg)` function; the
work itself lives in `pipeline`, `reconstruct`, `export`, `train` and `bench`. `parse(argv)` only parses (tests
parse every documented command line with it); `check(name, cfg)` then refuses, before anything is computed, what
would fail later (devices this machine lacks, image names that cannot be exported, unwritable outputs). Errors
that come from bad input (files, options) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro

from dust3r_ns.export.cli import ExportConfig, run as run_export
from dust3r_ns.fileio import writable_parent
from dust3r_ns.pipeline import (Network, NetworkConfig, Pairs, PairsConfig, Video, check_device, check_image_names,
                                run_pairs)
from dust3r_ns.predictions import PairPredictions, check_store_path
from dust3r_ns.reconstruct import ReconstructConfig, predictions_input, run as run_reconstruct
from dust3r_ns.video import VideoConfig


@dataclass
class InferConfig:
    """Run DUSt3R on every pair of a scene graph and save the pair predictions (no alignment); `dust3r-ns
    reconstruct PAIRS.npz` aligns and exports them later."""

    images: tyro.conf.Positional[list[Path]]
    """Image files, one folder of images, or one video clip."""
    out: Path = Path("pairs.npz")
    """Output file with the pair predictions (with --store disk: the pair store folder)."""
    network: Network = NetworkConfig()
    """Checkpoint and device of the network."""
    pairs: Pairs = PairsConfig()
    """Image size and pair graph."""
    video: Video = VideoConfig()
    """Frame sampling when the input is one video clip (--fps, --num-frames, --min-sharpness)."""


def run_infer(cfg: InferConfig) -> PairPredictions | None:
    t0 = time.perf_counter()
    preds = run_pairs(cfg.images, cfg.network, cfg.pairs, video=cfg.video,
                      shard_dir=cfg.out.resolve().parent / f".{cfg.out.name}.shards", store_path=cfg.out)
    if preds is None:   # a torchrun rank other than 0: its share is written, rank 0 saves the whole
        return None
    if not preds.on_disk:   # (a pair store is written at cfg.out as it is decoded)
        preds.save(cfg.out)
    print(f"wrote {cfg.out}: {preds.n_edges} pairs, mean confidence {preds.mean_confidence():.2f}, "
          f"{time.perf_counter() - t0:.1f} s")
    return preds


COMMANDS = {"infer": (InferConfig, run_infer), "reconstruct": (ReconstructConfig, run_reconstruct),
            "export": (ExportConfig, run_export)}
# `dust3r-ns bench NAME`: module of dust3r_ns.bench and its config class (imported only when that bench runs)
BENCHES = {"inference": "InferenceBenchConfig", "align": "AlignBenchConfig", "model": "ModelEvalConfig",
           "tracks": "TracksBenchConfig", "robust": "RobustBenchConfig", "splat": "SplatBenchConfig",
           "scale": "ScaleBenchConfig"}
BENCH_MODULES = {"model": "model_eval"}


def _bench_config(argv: list[str]) -> tuple[Any, Any]:
    """(config class, run function) of `dust3r-ns bench NAME`."""
    if not argv or argv[0] not in BENCHES:
        raise SystemExit(f"usage: dust3r-ns bench {{{'|'.join(BENCHES)}}} [--help]")
    module = importlib.import_module(f"dust3r_ns.bench.{BENCH_MODULES.get(argv[0], argv[0])}")
    return getattr(module, BENCHES[argv[0]]), module.run


def parse(argv: list[str]) -> tuple[str, Any]:
    """(command, config) of a `dust3r-ns` command line (argv without the program name); runs nothing. Bad flags
    exit with status 2 and tyro's message; an unknown command raises ValueError."""
    name, rest = argv[0], argv[1:]
    if name == "bench":
        Config, _ = _bench_config(rest)
        return name, tyro.cli(Config, args=rest[1:], prog=f"dust3r-ns bench {rest[0]}")
    if name == "train":  # presets (--preset NAME) are applied before the command-line fields
        from dust3r_ns.train.loop import make_config

        return name, make_config(rest)
    if name in COMMANDS:
        return name, tyro.cli(COMMANDS[name][0], args=rest, prog=f"dust3r-ns {name}")
    raise ValueError(f"unknown command {name!r}")


def check(name: str, cfg: Any) -> None:
    """Refuse (ValueError, one line) what would only fail after the network or the alignment ran."""
    if name in ("infer", "reconstruct"):
        check_device(cfg.network.device, "--device")
        if name == "reconstruct":
            check_device(cfg.align.device, "--align.device")
        if name == "infer" or predictions_input(cfg.images) is None:
            check_image_names(cfg.images)
    if name == "infer":
        if cfg.network.store == "disk":
            if cfg.out.suffix == ".npz":
                raise ValueError(f"--out {cfg.out}: with --store disk the pair predictions are a folder (a pair "
                                 "store); name one, e.g. --out pairs/")
            check_store_path(cfg.out)
        elif cfg.out.suffix != ".npz":
            raise ValueError(f"--out {cfg.out}: pair predictions are saved as .npz; name the file e.g. pairs.npz "
                             "(or write a pair store folder with --store disk)")
        writable_parent(cfg.out, "pair predictions")
    if name == "train" and cfg.device != "auto":
        check_device(cfg.device, "--device")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: dust3r-ns {" + ",".join(list(COMMANDS) + ["train", "bench"]) + "} [--help]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS and name not in ("train", "bench"):
        print(f"dust3r-ns: unknown command {name!r}; {usage}", file=sys.stderr)
        return 2
    try:
        name, cfg = parse(argv)
        check(name, cfg)
        if name == "bench":
            _bench_config(argv[1:])[1](cfg)
        elif name == "train":
            from dust3r_ns.train.loop import main as train_main

            train_main(cfg)
        else:
            COMMANDS[name][1](cfg)
    except (ValueError, OSError) as e:
        print(f"dust3r-ns {name}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
