"""DUSt3R training loop: `TrainConfig` (tyro dataclass), `run(cfg)` and `main()` (`dust3r-ns train`).

One process or `torchrun --nproc_per_node=N` (DistributedDataParallel; NCCL on GPUs, gloo on CPU). AdamW
(0.9, 0.95), linear warm-up then cosine to `min_lr` (per iteration, by fractional epoch), gradient accumulation,
AMP on CUDA, gradient clipping, seeded data order, eval every K epochs, tensorboard scalars, tqdm progress.
Checkpoints `checkpoint-last.pth` / `checkpoint-best.pth` in the official `.pth` layout plus optimiser, scaler,
epoch/step and RNG state, written atomically by rank 0 only; `--resume last` continues exactly.
Presets: `--preset NAME` loads the package's configs/NAME.json (or a .json path); command-line flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch

TINY_MODEL = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='PatchEmbedDust3R', img_size=(128, 128), "
              "head_type='linear', output_mode='pts3d', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), "
              "enc_embed_dim=192, enc_depth=6, enc_num_heads=3, dec_embed_dim=128, dec_depth=4, dec_num_heads=4, "
              "landscape_only=False)")
CONFIG_DIR = resources.files("dust3r_ns") / "configs"  # the presets, package data (also in an installed wheel)


@dataclass
class TrainConfig:
    """Train DUSt3R (`dust3r-ns train`). Every field is a flag; `--preset NAME` loads a preset first."""

    preset: str = ""
    """Preset name (dust3r_ns/configs/NAME.json) or path to a .json file with TrainConfig fields."""
    model: str = TINY_MODEL
    """Constructor string of the network (as in the official checkpoints' args.model)."""
    pretrained: str = ""
    """Initialise from a CroCo or DUSt3R checkpoint (.pth / HF folder / hub name); partial loads are reported."""
    dataset: Literal["synthetic", "co3d"] = "synthetic"
    data_root: str = ""
    """Co3d: folder produced by DUSt3R's CO3D preprocessing."""
    train_pairs: int = 2000
    """Synthetic: pairs per epoch."""
    test_pairs: int = 64
    """Synthetic: held-out pairs (another seed)."""
    resolution: tuple[int, ...] = (128, 128)
    """Training resolution(s) as W H [W H ...]; each batch draws one."""
    test_resolution: tuple[int, ...] = ()
    """Test resolution (W H); default: the first training resolution."""
    baseline_deg: tuple[float, float] = (5.0, 60.0)
    """Synthetic: angular separation range of the two cameras."""
    baseline_sampling: Literal["uniform", "log", "mixed"] = "uniform"
    """Synthetic: separation over baseline_deg: uniform, log-uniform (short baselines) or each half the time."""
    same_ring: float = 0.0
    """Synthetic: share of pairs whose cameras share one radius and height (orbit/video neighbours)."""
    jitter: float = 0.0
    """Colour jitter strength (training set only)."""
    cache: bool = False
    """Synthetic: keep rendered pairs in memory (per process/worker)."""
    seed: int = 0
    batch_size: int = 8
    """Per process."""
    accum_iter: int = 1
    epochs: int = 10
    warmup_epochs: float = 1.0
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    """Max gradient norm (0: off)."""
    amp: Literal["auto", "fp16", "bf16", "none"] = "auto"
    """Mixed precision on CUDA (auto = fp16 with loss scaling); ignored on CPU."""
    eval_every: int = 1
    save_every_steps: int = 0
    """Also write checkpoint-last.pth every N optimiser steps (0: only at epoch ends)."""
    output_dir: str = "runs/train"
    resume: str = ""
    """'last' (output_dir/checkpoint-last.pth) or a checkpoint path."""
    num_workers: int = 0
    device: str = "auto"
    export_hf: str = ""
    """At the end, write the final model as a Hugging Face folder here (config.json + model.safetensors)."""
    tensorboard: bool = True
    progress: bool = True
    log_every: int = 20
    stop_after_steps: int = 0
    """Testing: exit right after this many optimiser steps of this run (as if killed)."""
    stop_after_epochs: int = 0
    """End the run (evaluated and saved as usual) after this epoch while the lr schedule still spans `epochs`."""


def preset_names() -> list[str]:
    """Names of the presets shipped in the package (dust3r_ns/configs/*.json)."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(q.name[: -len(".json")] for q in CONFIG_DIR.iterdir() if q.is_file() and q.name.endswith(".json"))


def load_preset(name: str) -> dict:
    """Fields of a preset: dust3r_ns/configs/NAME.json (package data) or a path to a .json file."""
    p = Path(name)
    if p.suffix != ".json":
        p = CONFIG_DIR / f"{name}.json"  # type: ignore[assignment]  # a Traversable
    if not p.is_file():
        known = preset_names()
        raise FileNotFoundError(f"train preset {name!r}: {p} not found (known presets: {', '.join(known) or 'none'})")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"train preset {p}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for k, v in data.items():
        if k.startswith("_"):
            continue  # comments, the reproduction command...
        if k not in fields:
            raise ValueError(f"train preset {p}: unknown field {k!r}; valid fields: {', '.join(fields)}")
        out[k] = tuple(v) if isinstance(v, list) else v
    out["preset"] = name
    return out


def make_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line: `--preset NAME` first, other flags override the preset's fields."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    base = TrainConfig()
    for i, a in enumerate(argv):
        name = a.split("=", 1)[1] if a.startswith("--preset=") else (argv[i + 1] if a == "--preset" and i + 1 < len(argv) else None)
        if name:
            base = TrainConfig(**load_preset(name))
    return tyro.cli(TrainConfig, args=argv, default=base, prog="dust3r-ns train")


# --------------------------------------------------------------------------------------------------------------

def lr_at(cfg: TrainConfig, epoch_f: float) -> float:
    """Linear warm-up to cfg.lr over warmup_epochs, then half-cosine to min_lr at cfg.epochs."""
    if epoch_f < cfg.warmup_epochs:
        return cfg.lr * epoch_f / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    t = min(max((epoch_f - cfg.warmup_epochs) / span, 0.0), 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms (1-D tensors) and position/token embeddings (as in the published recipe)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith(".bias") or "pos_embed" in n else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, dev


def build_datasets(cfg: TrainConfig):
    from .datasets import Co3dPreprocessed, SyntheticScenes, parse_resolution

    test_res = parse_resolution(cfg.test_resolution)[:1] if cfg.test_resolution else parse_resolution(cfg.resolution)[:1]
    if cfg.dataset == "synthetic":
        sampling = dict(baseline_sampling=cfg.baseline_sampling, same_ring=cfg.same_ring)
        train = SyntheticScenes(cfg.train_pairs, cfg.resolution, cfg.seed, cfg.baseline_deg, jitter=cfg.jitter,
                                cache=cfg.cache, **sampling)
        test = SyntheticScenes(cfg.test_pairs, test_res, cfg.seed + 1_000_003, cfg.baseline_deg, cache=True, **sampling)
    else:
        if not cfg.data_root:
            raise ValueError("dataset co3d needs --data-root (the CO3D preprocessing output folder)")
        train = Co3dPreprocessed(cfg.data_root, "train", cfg.resolution, cfg.seed, jitter=cfg.jitter)
        test = Co3dPreprocessed(cfg.data_root, "test", test_res, cfg.seed)
    return train, test


def build_model(cfg: TrainConfig, log) -> torch.nn.Module:
    from ..model.checkpoint import build_model as _build, load_croco_init, parse_model_spec

    cls, kwargs = parse_model_spec(cfg.model, "--model")
    model = _build(kwargs, source="--model")
    if cfg.pretrained:
        rep = load_croco_init(model, cfg.pretrained)
        log(f"initialised from {cfg.pretrained}: {len(rep['loaded'])} tensors loaded, {len(rep['copied'])} copied "
            f"(decoder 2 from 1), {len(rep['missing'])} missing (kept random: {', '.join(rep['missing'][:4])}"
            f"{'...' if len(rep['missing']) > 4 else ''}), {len(rep['unexpected'])} unused")
    return model


def _to(view: dict, dev: torch.device) -> dict:
    return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in view.items()}


def _rng_state() -> dict:
    st = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(st[1].astype(np.int64)),
            "numpy_pos": int(st[2]), "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy_key"].numpy().astype(np.uint32), st["numpy_pos"], 0, 0.0))
    if st.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_train_checkpoint(path: Path) -> dict:
    """Read a training checkpoint (weights-only load) and check it has what a resume needs."""
    if not path.is_file():
        raise FileNotFoundError(f"resume: checkpoint {path} not found; train first or pass the right --resume path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"resume: cannot load {path} ({type(exc).__name__}); the file is damaged, use an older one")
    need = {"model", "optimizer", "epoch", "batch_in_epoch", "step"}
    if not isinstance(ck, dict) or need - set(ck):
        raise ValueError(f"resume: {path} is not a training checkpoint of this trainer (missing "
                         f"{sorted(need - set(ck)) if isinstance(ck, dict) else 'everything'}); use --pretrained for weights only")
    return ck


@torch.no_grad()
def evaluate(model, loader, dev, amp_ctx, world: int) -> dict:
    """Mean test criteria over the loader (all ranks reduced): train loss, Regr3D, Regr3D_ScaleShiftInv."""
    from .losses import Regr3D, Regr3D_ScaleShiftInv, make_train_criterion

    crit, r3, ssi = make_train_criterion(), Regr3D(), Regr3D_ScaleShiftInv()
    sums = torch.zeros(4, dtype=torch.float64)
    model.eval()
    for v1, v2 in loader:
        v1, v2 = _to(v1, dev), _to(v2, dev)
        with amp_ctx():
            p1, p2 = model(v1, v2)
        p1 = {k: v.float() for k, v in p1.items()}
        p2 = {k: v.float() for k, v in p2.items()}
        n = len(v1["img"])
        sums += torch.tensor([float(crit(v1, v2, p1, p2)[0]) * n, float(r3.loss(v1, v2, p1, p2)[0]) * n,
                              float(ssi.loss(v1, v2, p1, p2)[0]) * n, n], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train()
    n = max(float(sums[3]), 1.0)
    return {"loss": float(sums[0]) / n, "Regr3D": float(sums[1]) / n, "Regr3D_ScaleShiftInv": float(sums[2]) / n}


class ScalarLog:
    """tensorboard scalars of the main process, written by tensorboard's background thread. That thread never
    prints a traceback (`_quiet_tensorboard_threads`): its failure (e.g. a full disk) is raised in the training
    loop at the next call, or by `close`, as one OSError naming the log folder."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        _quiet_tensorboard_threads()
        self.folder = folder
        self._writer = None
        try:
            self._writer = SummaryWriter(str(folder))
        except Exception as exc:  # the writer thread can fail while the constructor still writes
            raise self._error(exc) from None

    def _error(self, exc: Exception) -> OSError:
        return OSError(f"tensorboard log {self.folder}: {exc}; free space there or pass --no-tensorboard")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        try:
            self._writer.add_scalar(tag, value, step)
        except Exception as exc:
            raise self._error(exc) from None

    def close(self, quiet: bool = False) -> None:
        """Flush and stop the writer thread; its error is raised unless `quiet` (another error is on its way)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as exc:
            if not quiet:
                raise self._error(exc) from None


_THREAD_HOOK_INSTALLED = False


def _quiet_tensorboard_threads() -> None:
    """Chain a `threading.excepthook` that drops exceptions of tensorboard's event-writer threads (tensorboard
    keeps the exception and raises it in the writing thread; `ScalarLog` reports it) and passes on all others."""
    global _THREAD_HOOK_INSTALLED
    if _THREAD_HOOK_INSTALLED:
        return
    import threading

    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook

    def hook(args):
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)

    threading.excepthook = hook
    _THREAD_HOOK_INSTALLED = True


def run(cfg: TrainConfig) -> dict:
    """Train according to cfg. Returns the final test metrics and counters (on every rank). On an error the
    tensorboard writer is closed (quietly when an error propagates)."""
    logs: list[ScalarLog] = []
    try:
        result = _run(cfg, logs)
    except BaseException:
        for log in logs:
            log.close(quiet=True)
        raise
    for log in logs:  # also after an early stop (--stop-after-steps)
        log.close()
    return result


def _run(cfg: TrainConfig, logs: list) -> dict:
    from contextlib import nullcontext

    from torch.utils.data import DataLoader

    from ..model.checkpoint import save_hf, save_pth
    from .datasets import PairBatchSampler, collate_pairs
    from .losses import make_train_criterion

    if cfg.batch_size < 1 or cfg.accum_iter < 1 or cfg.epochs < 1:
        raise ValueError("batch_size, accum_iter and epochs must be >= 1")
    rank, world, dev = setup_distributed(cfg.device)
    out = Path(cfg.output_dir)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if is_main:
            print(f"[train] {msg}", flush=True)
            with open(out / "log.txt", "a") as f:
                f.write(msg + "\n")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_set, test_set = build_datasets(cfg)
    model = build_model(cfg, log).to(dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    amp = "none" if dev.type != "cuda" else ("fp16" if cfg.amp == "auto" else cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)

    def amp_ctx():
        return torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    start_epoch, start_batch, step, best = 0, 0, 0, math.inf
    if cfg.resume:
        path = out / "checkpoint-last.pth" if cfg.resume == "last" else Path(cfg.resume)
        ck = load_train_checkpoint(path)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if "scaler" in ck and ck["scaler"]:
            scaler.load_state_dict(ck["scaler"])
        start_epoch, start_batch, step = int(ck["epoch"]), int(ck["batch_in_epoch"]), int(ck["step"])
        best = float(ck.get("best_so_far", math.inf))
        if "rng" in ck:
            _set_rng_state(ck["rng"])
        log(f"resumed from {path}: epoch {start_epoch} batch {start_batch} step {step}")
    ddp_model = model
    if world > 1:
        # find_unused_parameters: `mask_token` (CroCo pretraining) takes no part in DUSt3R's forward
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)

    sampler = PairBatchSampler(len(train_set), cfg.batch_size, len(train_set.resolutions), rank, world, cfg.seed)
    test_sampler = PairBatchSampler(len(test_set), max(1, min(cfg.batch_size, len(test_set) // world)), 1, rank, world,
                                    cfg.seed, shuffle=False)
    loader_kw = dict(collate_fn=collate_pairs, num_workers=cfg.num_workers, pin_memory=dev.type == "cuda")
    test_loader = DataLoader(test_set, batch_sampler=test_sampler, **loader_kw)
    n_batches = len(train_set) // (cfg.batch_size * world)
    criterion = make_train_criterion()
    writer = None
    if is_main and cfg.tensorboard:
        writer = ScalarLog(out / "tb")
        logs.append(writer)
    log(f"{n_params / 1e6:.2f}M parameters, {len(train_set)} train / {len(test_set)} test pairs, {world} process(es) "
        f"on {dev}, amp={amp}, {n_batches} batches/epoch")

    cfg_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}

    def save(name: str, epoch: int, batch: int) -> None:
        if not is_main:
            return
        entries = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                   "batch_in_epoch": batch, "step": step, "best_so_far": best, "rng": _rng_state(),
                   "scheduler": {"kind": "warmup_cosine", "lr": cfg.lr, "min_lr": cfg.min_lr,
                                 "warmup_epochs": cfg.warmup_epochs, "epochs": cfg.epochs}}
        save_pth(model, out / name, args=cfg_dict, entries=entries)

    skipped, run_steps, t0, metrics = 0, 0, time.time(), {}
    if start_epoch == 0 and start_batch == 0 and not cfg.resume:
        metrics = evaluate(ddp_model, test_loader, dev, amp_ctx, world)
        log("initial test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if writer:
            for k, v in metrics.items():
                writer.add_scalar(f"test/{k}", v, 0)
    from tqdm import tqdm

    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        loader = DataLoader(train_set, batch_sampler=sampler, **loader_kw)
        bar = tqdm(loader, total=len(sampler), desc=f"epoch {epoch}", disable=not (is_main and cfg.progress),
                   dynamic_ncols=True, leave=False)
        b = sampler.start_batch
        for v1, v2 in bar:
            skipped += sum(v1["skipped"])
            v1, v2 = _to(v1, dev), _to(v2, dev)
            if b % cfg.accum_iter == 0:
                lr = lr_at(cfg, epoch + b / n_batches)
                for g in optimizer.param_groups:
                    g["lr"] = lr
            sync = (b + 1) % cfg.accum_iter == 0 or b + 1 == n_batches
            ctx = ddp_model.no_sync() if (world > 1 and not sync) else nullcontext()
            with ctx:
                with amp_ctx():
                    p1, p2 = ddp_model(v1, v2)
                p1 = {k: v.float() for k, v in p1.items()}
                p2 = {k: v.float() for k, v in p2.items()}
                loss, details = criterion(v1, v2, p1, p2)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at epoch {epoch} batch {b}; lower --lr or check data")
                scaler.scale(loss / cfg.accum_iter).backward()
            b += 1
            if not sync:
                continue
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run_steps += 1
            if is_main:
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
                if writer and step % max(cfg.log_every, 1) == 0:
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("train/regr", details["regr_mean"], step)
                    writer.add_scalar("train/lr", lr, step)
                if step % max(cfg.log_every, 1) == 0 and not cfg.progress:
                    log(f"epoch {epoch} step {step} loss {loss_value:.4f} regr {details['regr_mean']:.4f} "
                        f"lr {lr:.2e} {time.time() - t0:.0f}s")
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 and b < n_batches:
                save("checkpoint-last.pth", epoch, b)
            if cfg.stop_after_steps and run_steps >= cfg.stop_after_steps:
                if world > 1:
                    torch.distributed.barrier()
                return {"stopped_at_step": step, "skipped": skipped, "model": model}
        bar.close()
        last = epoch + 1 == cfg.epochs or epoch + 1 == cfg.stop_after_epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            metrics = evaluate(ddp_model, test_loader, dev, amp_ctx, world)
            log(f"epoch {epoch} test: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                + f" ({time.time() - t0:.0f}s, {skipped} bad samples skipped)")
            if writer:
                for k, v in metrics.items():
                    writer.add_scalar(f"test/{k}", v, step)
            if metrics["Regr3D_ScaleShiftInv"] < best:
                best = metrics["Regr3D_ScaleShiftInv"]
                save("checkpoint-best.pth", epoch + 1, 0)
        save("checkpoint-last.pth", epoch + 1, 0)
        if last:
            break
    if writer:
        writer.close()
    if is_main and cfg.export_hf:
        save_hf(model.float().cpu(), cfg.export_hf)
        log(f"wrote {cfg.export_hf}")
    if world > 1:
        torch.distributed.barrier()
    return dict(metrics, steps=step, skipped=skipped, seconds=time.time() - t0, model=model)


def main(argv: list[str] | TrainConfig | None = None) -> None:
    """Train from a command line (argv, default sys.argv) or a parsed config; bad input and failed writes exit
    with status 2 and one line."""
    try:
        run(argv if isinstance(argv, TrainConfig) else make_config(argv))
    except (OSError, ValueError) as exc:
        print(f"dust3r-ns train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
