"""The `dust3r-ns` command line: `infer`, `reconstruct`, `export`, `train`, `bench {inference,align,model,tracks}`.

Each subcommand is a dataclass config parsed by tyro (every field has a `--flag`) plus a `run(cfg)` function; the
work itself lives in `pipeline`, `reconstruct`, `export`, `train` and `bench`. Errors that come from bad input
(files, options) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from dust3r_ns.export.cli import ExportConfig, run as run_export
from dust3r_ns.pipeline import Network, NetworkConfig, Pairs, PairsConfig, Video, run_pairs
from dust3r_ns.predictions import PairPredictions
from dust3r_ns.reconstruct import ReconstructConfig, run as run_reconstruct
from dust3r_ns.video import VideoConfig


@dataclass
class InferConfig:
    """Run DUSt3R on every pair of a scene graph and save the pair predictions (no alignment); `dust3r-ns
    reconstruct PAIRS.npz` aligns and exports them later."""

    images: tyro.conf.Positional[list[Path]]
    """Image files, one folder of images, or one video clip."""
    out: Path = Path("pairs.npz")
    """Output file with the pair predictions."""
    network: Network = NetworkConfig()
    """Checkpoint and device of the network."""
    pairs: Pairs = PairsConfig()
    """Image size and pair graph."""
    video: Video = VideoConfig()
    """Frame sampling when the input is one video clip (--fps, --num-frames, --min-sharpness)."""


def run_infer(cfg: InferConfig) -> PairPredictions | None:
    t0 = time.perf_counter()
    preds = run_pairs(cfg.images, cfg.network, cfg.pairs, video=cfg.video,
                      shard_dir=cfg.out.resolve().parent / f".{cfg.out.name}.shards")
    if preds is None:   # a torchrun rank other than 0: its share is written, rank 0 saves the whole
        return None
    preds.save(cfg.out)
    print(f"wrote {cfg.out}: {preds.n_edges} pairs, mean confidence {preds.mean_confidence():.2f}, "
          f"{time.perf_counter() - t0:.1f} s")
    return preds


COMMANDS = {"infer": (InferConfig, run_infer), "reconstruct": (ReconstructConfig, run_reconstruct),
            "export": (ExportConfig, run_export)}
# `dust3r-ns bench NAME`: module of dust3r_ns.bench and its config class (imported only when that bench runs)
BENCHES = {"inference": "InferenceBenchConfig", "align": "AlignBenchConfig", "model": "ModelEvalConfig",
           "tracks": "TracksBenchConfig", "robust": "RobustBenchConfig"}
BENCH_MODULES = {"model": "model_eval"}


def _bench(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHES:
        raise SystemExit(f"usage: dust3r-ns bench {{{'|'.join(BENCHES)}}} [--help]")
    module = importlib.import_module(f"dust3r_ns.bench.{BENCH_MODULES.get(argv[0], argv[0])}")
    config = getattr(module, BENCHES[argv[0]])
    module.run(tyro.cli(config, args=argv[1:], prog=f"dust3r-ns bench {argv[0]}"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: dust3r-ns {" + ",".join(list(COMMANDS) + ["train", "bench"]) + "} [--help]"
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
        elif name in COMMANDS:
            cfg_cls, fn = COMMANDS[name]
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
