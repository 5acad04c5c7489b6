"""The `dust3r-ns` command line: `infer`, `reconstruct`, `export`, `train`, `bench {inference,align,model}`.

Each subcommand is a dataclass config parsed by tyro (every field has a `--flag`) plus a `run(cfg)` function; the
work itself lives in `pipeline`, `reconstruct`, `export`, `train` and `bench`. Errors that come from bad input
(files, options) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from dust3r_ns.export.cli import ExportConfig, run as run_export
from dust3r_ns.pipeline import Network, NetworkConfig, Pairs, PairsConfig, run_pairs
from dust3r_ns.predictions import PairPredictions
from dust3r_ns.reconstruct import ReconstructConfig, run as run_reconstruct


@dataclass
class InferConfig:
    """Run DUSt3R on every pair of a scene graph and save the pair predictions (no alignment); `dust3r-ns
    reconstruct PAIRS.npz` aligns and exports them later."""

    images: tyro.conf.Positional[list[Path]]
    """Image files or one folder of images."""
    out: Path = Path("pairs.npz")
    """Output file with the pair predictions."""
    network: Network = NetworkConfig()
    """Checkpoint and device of the network."""
    pairs: Pairs = PairsConfig()
    """Image size and pair graph."""


def run_infer(cfg: InferConfig) -> PairPredictions:
    t0 = time.perf_counter()
    preds = run_pairs(cfg.images, cfg.network, cfg.pairs)
    preds.save(cfg.out)
    print(f"wrote {cfg.out}: {preds.n_edges} pairs, mean confidence {preds.mean_confidence():.2f}, "
          f"{time.perf_counter() - t0:.1f} s")
    return preds


COMMANDS = {"infer": (InferConfig, run_infer), "reconstruct": (ReconstructConfig, run_reconstruct),
            "export": (ExportConfig, run_export)}
BENCHES = ("inference", "align", "model", "robust")


def _bench(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHES:
        raise SystemExit(f"usage: dust3r-ns bench {{{'|'.join(BENCHES)}}} [--help]")
    if argv[0] == "inference":
        from dust3r_ns.bench.inference import InferenceBenchConfig as Config, run
    elif argv[0] == "align":
        from dust3r_ns.bench.align import AlignBenchConfig as Config, run  # type: ignore[no-redef]
    elif argv[0] == "robust":
        from dust3r_ns.bench.robust import RobustBenchConfig as Config, run  # type: ignore[no-redef]
    else:
        from dust3r_ns.bench.model_eval import ModelEvalConfig as Config, run  # type: ignore[no-redef]
    run(tyro.cli(Config, args=argv[1:], prog=f"dust3r-ns bench {argv[0]}"))


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
