"""`dust3r-ns bench splat`: held-out view quality of `dust3r-splatfacto` splats by initialisation, one run.

For each case (a `dust3r_ns.synth` scene seed and a number of training views) the synth renderer draws
`train + held_out` cameras on one arc; the held-out cameras are interleaved with the training ones and never reach
the DUSt3R inference, the alignment or the seed points. Each row trains `dust3r-splatfacto` (the `ns-train`
method's own `TrainerConfig` from `method.make_config()`, on its `dust3r` dataparser reading a reconstruction
folder; only the iteration budget, the point cap and the row's initialisation are changed) for the same number of
iterations (the same torch random state at the start of every row):

- `gt`: ground-truth poses, intrinsics and points (depth maps back-projected), camera optimizer off;
- `dust3r`: a DUSt3R model's reconstruction of the training views (`--model`, default the bundled one; kept in the
  reconstruction cache `--cache-dir` between runs), camera optimizer off;
- `dust3r-refine`: the same with joint pose refinement (the method's camera optimizer mode, `REFINE_MODE` when
  that is off, and its `camera_opt` learning-rate schedule);
- `random`: DUSt3R poses and intrinsics, splatfacto's random points (as many as the DUSt3R seeds), camera
  optimizer as `dust3r-splatfacto`'s defaults.

Evaluation protocol (every row the same; only training cameras are used to place the held-out ones): a similarity
(Umeyama on the camera centres) maps the ground-truth training cameras onto the trained (possibly refined) ones and
puts each held-out ground-truth pose into the splat's frame; the held-out focal is the ground truth's times the
median trained/ground-truth focal ratio of the training cameras. PSNR/SSIM/LPIPS are reported there
("unregistered"), and after test-time registration: each held-out pose (6-DoF, right-multiplied camera-frame
update) is optimised with Adam on the photometric L1 against the frozen splat, coarse to fine (`register_downscale`
levels, each from the previous level's pose), keeping the best pose seen, as InstantSplat does at test time. The
registration has to absorb the DUSt3R rows' pose error (the splat is built in DUSt3R's slightly distorted frame,
so a Sim(3) on camera centres places held-out views a few degrees off): with too few steps at one level the
figures measure that misplacement rather than the splat.
LPIPS is NaN when its AlexNet weights are not available offline.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dust3r_ns import conventions as cv
from dust3r_ns import synth
from dust3r_ns.bench.common import parse_hw
from dust3r_ns.fileio import atomic_write
from dust3r_ns.geometry import so3_exp
from dust3r_ns.metrics import pose_metrics, umeyama_sim3

ROWS = ("gt", "dust3r", "dust3r-refine", "random")
REFINE_MODE = "SO3xR3"
"""Camera optimizer of the `dust3r-refine` row when `dust3r-splatfacto`'s default is off (its learning-rate schedule
is the method's `camera_opt` optimizer either way)."""
PROTOCOL = ("held-out GT pose mapped by Sim(3) (train cameras after training -> GT), GT focal x the train cameras' "
            "median focal ratio, then coarse-to-fine 6-DoF photometric-L1 registration against the frozen splat: "
            "{steps} Adam steps at each of 1/{down} size (lr {lr} x factor / finest factor)")


@dataclass
class SplatBenchConfig:
    """Cases, budget and rows of `dust3r-ns bench splat`."""

    cases: list[str] = field(default_factory=lambda: ["3:4", "5:8", "8:12"])
    """Cases as SEED:VIEWS: synth scene seed and number of training views."""
    held_out: int = 2
    """Held-out views per case (interleaved with the training views on the arc)."""
    size: str = "48x64"
    """Rendered image size HxW (training and evaluation)."""
    baseline: str = "moderate"
    """Camera arc of `synth.camera_path` (small, moderate, wide)."""
    iterations: int = 300
    """Training iterations of every row (same budget for all)."""
    max_points: int = 4000
    """Seed-point cap of every row (the CPU rasterizer's cost grows with the Gaussian count)."""
    footprint_scale: float = -1.0
    """Seeded rows' initial Gaussian scale in pixel footprints (`--pipeline.model.footprint-scale`; 0: splatfacto's
    nearest-neighbour scales); negative: `dust3r-splatfacto`'s default."""
    downscales: int = -1
    """splatfacto's `num_downscales` of every row: the first `resolution_schedule` (3000) steps train at 1/2^k size,
    so a budget of a few hundred iterations with the method's default (2) trains at 1/4 size throughout. 0: full size
    from the start; negative: the method's default."""
    model: str = ""
    """Checkpoint of the DUSt3R rows (.pth, Hugging Face folder, hub name); default: the bundled model."""
    full_frame: bool = False
    """The DUSt3R rows' network inputs keep the whole frame (`--full-frame` of reconstruct / the dataparser; the bundled
    model is a 224 one, whose reference preprocessing keeps the centre square: 48 of a 48x64 photo's 64 columns)."""
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    """Rows to run: gt, dust3r, dust3r-refine, random."""
    register_steps: int = 100
    """Adam steps of the held-out pose registration at each level of `register_downscale` (0: unregistered figures
    only)."""
    register_lr: float = 2e-3
    """Learning rate of the registration at the finest level (rotation in radians, translation in scene units); a
    level reduced by factor f uses register_lr x f / (the last level's factor)."""
    register_downscale: list[int] = field(default_factory=lambda: [8, 4, 2])
    """Registration pyramid, coarse to fine: each level compares renders and held-out images reduced by its factor
    (area average), starting from the previous level's pose; metrics are computed at full size. A single 2 with
    60 steps is the protocol before coarse-to-fine registration."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    quick: bool = False
    """Tiny smoke configuration (one 3-view case at 24x32, 20 iterations, 10 registration steps): CI."""
    cache_dir: str = "~/.cache/dust3r_ns/bench_splat"
    """Reconstruction cache of the DUSt3R rows (entries keyed by the rendered photos, the model file and the options,
    so a new model or option recomputes); '' : always recompute."""
    work_dir: str = ""
    """Folder for the rendered photos, reconstructions and training outputs (default: a temporary one, removed)."""
    json_out: str = ""
    """Optional path for the results as JSON."""

    def effective(self) -> "SplatBenchConfig":
        """The configuration actually run (`quick` replaces the sizes)."""
        if not self.quick:
            return self
        import dataclasses

        return dataclasses.replace(self, cases=["3:3"], held_out=1, size="24x32", iterations=20, max_points=500,
                                   register_steps=10, register_downscale=[1], quick=False)


# ---------------------------------------------------------------------------------------------------- scenes
def make_case(seed: int, n_train: int, held_out: int, H: int, W: int, baseline: str) -> dict:
    """Render `n_train + held_out` views on one arc of scene `seed`; held-out views interleaved (never the ends).

    Returns dict(train=[views], test=[views]) of `synth.render_views` dicts (with `pts3d`), plus index lists."""
    if n_train < 2 or held_out < 1:
        raise ValueError(f"bench splat: need >= 2 training and >= 1 held-out views, got {n_train} and {held_out}")
    n = n_train + held_out
    scene = synth.make_scene(seed)
    c2w, K = synth.camera_path(scene, n, baseline=baseline, seed=seed, H=H, W=W)
    views = synth.render_views(scene, c2w, K, H, W, points=True)
    test_idx = sorted({int(round(x)) for x in np.linspace(0, n - 1, held_out + 2)[1:-1]})
    train_idx = [k for k in range(n) if k not in test_idx]
    return dict(train=[views[k] for k in train_idx], test=[views[k] for k in test_idx], train_idx=train_idx,
                test_idx=test_idx)


def write_photos(folder: Path, views: list[dict]) -> list[Path]:
    """Save the views' RGB as `view_XX.png` (the order of `views`)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, v in enumerate(views):
        p = folder / f"view_{k:02d}.png"
        atomic_write(p, lambda tmp, rgb=v["rgb"]: Image.fromarray(rgb).save(tmp, format="PNG"), "bench view")
        paths.append(p)
    return paths


def gt_reconstruction(views: list[dict], names: list[str]):
    """A `Reconstruction` of ground truth: GT poses, intrinsics, depth maps (confidence 10 where valid, else 0)."""
    from dust3r_ns.scene import Reconstruction

    H, W = views[0]["depth"].shape
    return Reconstruction(
        names=names, orig_sizes=np.array([[W, H]] * len(views)), transforms=np.array([[1.0, 1.0, 0.0, 0.0]] * len(views)),
        c2w=np.stack([v["c2w"] for v in views]), K=np.stack([v["K"] for v in views]),
        depths=[v["depth"] for v in views], confs=[np.where(v["valid"], 10.0, 0.0).astype(np.float32) for v in views],
        rgbs=[v["rgb"] for v in views], meta={"source": "ground truth"})


def dust3r_reconstruction(paths: list[Path], cache_dir: Path | None = None, full_frame: bool = False, model: str = ""):
    """A DUSt3R model's reconstruction of `paths` (pair inference + global alignment), on CPU/CUDA; with
    `cache_dir`, reused from / stored in the reconstruction cache (`dust3r_ns.cache`: keyed by the photos' contents,
    the model file and the options); `full_frame`: `PairsConfig.full_frame`; `model`: a checkpoint (default: the
    bundled model)."""
    from dust3r_ns.align import AlignConfig
    from dust3r_ns.cache import (build_reconstruction, inspect_photos, load_or_build, model_identity,
                                 reconstruction_options)
    from dust3r_ns.pipeline import NetworkConfig, PairsConfig, PointsConfig, default_model_source

    network = NetworkConfig(model=model or default_model_source())
    pairs, align, points = PairsConfig(full_frame=full_frame), AlignConfig(), PointsConfig()
    build = lambda ps: build_reconstruction(ps, network, pairs, align, points, label="bench splat")  # noqa: E731
    if cache_dir is None:
        return build(paths)
    return load_or_build(inspect_photos(paths), cache_dir, model_identity(network.model),
                         reconstruction_options(network, pairs, align, points), build).rec


def save_folder(folder: Path, rec, photos: list[Path]) -> Path:
    """A reconstruction folder (`reconstruction.npz` + `images/`) that the `dust3r` dataparser reads as it is."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, p in zip(rec.names, photos):
        shutil.copyfile(p, folder / "images" / name)
    rec.save(folder / "reconstruction.npz")
    return folder


# ---------------------------------------------------------------------------------------------------- training
def trainer_config(data: Path, out: Path, row: str, iterations: int, max_points: int, num_seeds: int = 0,
                   footprint_scale: float = -1.0, downscales: int = -1):
    """`dust3r-splatfacto`'s TrainerConfig for one bench row: only data, budget, point cap, initialisation (seed
    scales: `footprint_scale` >= 0 replaces the method's), the training resolution schedule (`downscales` >= 0
    replaces splatfacto's `num_downscales`) and (for rows without refinement) the camera optimizer differ from what
    `ns-train dust3r-splatfacto` runs."""
    from dust3r_ns.nerfstudio.method import make_config
    from dust3r_ns.pipeline import PointsConfig

    if row not in ROWS:
        raise ValueError(f"bench splat: unknown row {row!r}; use {', '.join(ROWS)}")
    tc = make_config()
    dp = tc.pipeline.datamanager.dataparser
    dp.data = data
    dp.eval_mode = "all"            # every image of the reconstruction trains; held-out views are not in it
    dp.downscale_factor = 1
    dp.points = PointsConfig(conf_thr=dp.points.conf_thr, max_points=max_points)
    tc.output_dir = out
    tc.experiment_name = row
    tc.timestamp = "bench"
    tc.vis = "tensorboard"
    tc.max_num_iterations = iterations
    tc.steps_per_eval_image = tc.steps_per_eval_batch = tc.steps_per_eval_all_images = 10 ** 9
    tc.steps_per_save = 10 ** 9
    model = tc.pipeline.model
    if footprint_scale >= 0:
        model.footprint_scale = float(footprint_scale)
    if downscales >= 0:
        model.num_downscales = int(downscales)
    if row in ("gt", "dust3r"):
        model.camera_optimizer.mode = "off"
    elif row == "dust3r-refine" and model.camera_optimizer.mode == "off":
        model.camera_optimizer.mode = REFINE_MODE   # what --pipeline.model.camera-optimizer.mode turns on
    if row == "random":
        model.random_init = True
        model.num_random = max(int(num_seeds), 1)
    return tc


def train(tc) -> tuple[object, float]:
    """Build the trainer of `tc` and run its training iterations (callbacks included, as `Trainer.train`, without
    writers, evaluations or checkpoints). Returns (pipeline, seconds of training)."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    trainer = tc.setup(local_rank=0, world_size=1)
    trainer.setup()
    pipeline = trainer.pipeline
    pipeline.train()
    t0 = time.perf_counter()
    for step in range(tc.max_num_iterations):
        for cb in trainer.callbacks:
            cb.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        trainer.train_iteration(step)
        for cb in trainer.callbacks:
            cb.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
    seconds = time.perf_counter() - t0
    pipeline.eval()
    return pipeline, seconds


# ---------------------------------------------------------------------------------------------------- evaluation
def trained_train_c2w(pipeline) -> np.ndarray:
    """(N,4,4) OpenCV camera-to-world of the training cameras in the splat's (nerfstudio) frame, after the camera
    optimizer's updates (c2w @ adj, as `CameraOptimizer.apply_to_camera`)."""
    cams = pipeline.datamanager.train_dataset.cameras
    c2w = cams.camera_to_worlds.detach().cpu().double()  # [N, 3, 4]
    model = pipeline.model
    if model.camera_optimizer.config.mode != "off":
        with torch.no_grad():
            adj = model.camera_optimizer(torch.arange(len(c2w), device=model.device)).cpu().double()  # [N, 3, 4]
        c2w = torch.cat([c2w[:, :, :3] @ adj[:, :, :3], c2w[:, :, :3] @ adj[:, :, 3:] + c2w[:, :, 3:]], dim=2)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64).expand(len(c2w), 1, 4)
    return cv.opengl_to_opencv_c2w(torch.cat([c2w, bottom], dim=1).numpy())


def map_held_out(train_est: np.ndarray, train_gt: np.ndarray, test_gt: np.ndarray) -> np.ndarray:
    """Held-out GT poses (M,4,4) -> the splat's frame through the similarity fitted on the training camera centres
    (GT -> estimate): C' = s R C + t, R_c2w' = R R_c2w."""
    s, R, t = umeyama_sim3(train_gt[:, :3, 3], train_est[:, :3, 3])
    out = np.array(test_gt, dtype=np.float64, copy=True)
    out[:, :3, :3] = R @ test_gt[:, :3, :3]
    out[:, :3, 3] = s * test_gt[:, :3, 3] @ R.T + t
    return out


def ns_camera(c2w_gl: torch.Tensor, K: np.ndarray, H: int, W: int):
    """One nerfstudio camera (OpenGL c2w [3,4] or [1,3,4], package-pixel K -> nerfstudio pixel centres)."""
    from nerfstudio.cameras.cameras import Cameras, CameraType

    Kc = cv.K_to_colmap(np.asarray(K, np.float64))
    dev = c2w_gl.device
    f = lambda x: torch.tensor([[float(x)]], device=dev)  # noqa: E731
    return Cameras(camera_to_worlds=c2w_gl.reshape(1, 3, 4).float(), fx=f(Kc[0, 0]), fy=f(Kc[1, 1]), cx=f(Kc[0, 2]),
                   cy=f(Kc[1, 2]), width=torch.tensor([[W]], device=dev), height=torch.tensor([[H]], device=dev),
                   camera_type=CameraType.PERSPECTIVE)


def _se3_right(c2w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """[3,4] c2w times the camera-frame update exp(delta[:3]) | delta[3:] (rotation vector, translation)."""
    R = so3_exp(delta[:3])
    return torch.cat([c2w[:, :3] @ R, c2w[:, :3] @ delta[3:, None] + c2w[:, 3:]], dim=1)


def downscaled(K: np.ndarray, image: torch.Tensor, factor: int) -> tuple[np.ndarray, torch.Tensor]:
    """(K, image [H,W,3]) reduced by an integer factor: area average over factor x factor pixel blocks (the image
    cropped to a multiple of factor), K scaled about the pixel-edge origin (package pixels: c' = (c + 0.5)/f - 0.5)."""
    if factor <= 1:
        return np.asarray(K, np.float64), image
    H, W = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    small = torch.nn.functional.avg_pool2d(image[:H, :W].permute(2, 0, 1)[None], factor)[0].permute(1, 2, 0)
    Ks = cv.K_orig_to_net(K, np.array([1.0 / factor, 1.0 / factor, 0.0, 0.0]))   # a resize is a crop transform
    return Ks, small.contiguous()


def register(model, c2w_cv: np.ndarray, K: np.ndarray, image: torch.Tensor, steps: int, lr: float
             ) -> tuple[np.ndarray, float, float]:
    """Optimise one held-out pose against the frozen splat: Adam on the mean L1 between the render and `image`
    ([H,W,3] float in [0,1], intrinsics K); the best pose seen is kept. Returns (OpenCV c2w (4,4), L1 before,
    L1 after)."""
    H, W = image.shape[:2]
    dev = model.device
    image = image.to(dev)
    base = torch.from_numpy(cv.opencv_to_opengl_c2w(c2w_cv)[:3]).float().to(dev)
    delta = torch.zeros(6, device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    best, first, best_delta = math.inf, math.nan, delta.detach().clone()
    try:
        for it in range(steps + 1):
            rgb = model.get_outputs(ns_camera(_se3_right(base, delta), K, H, W))["rgb"]
            loss = (rgb - image).abs().mean()
            value = float(loss.detach())
            if it == 0:
                first = value
            if value < best:
                best, best_delta = value, delta.detach().clone()
            if it == steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    with torch.no_grad():
        c2w = _se3_right(base, best_delta).double().cpu().numpy()
    out = cv.opengl_to_opencv_c2w(np.concatenate([c2w, [[0.0, 0.0, 0.0, 1.0]]]))
    return out, first, best


def register_pyramid(model, c2w_cv: np.ndarray, K: np.ndarray, image: torch.Tensor, factors: list[int], steps: int,
                     lr: float) -> tuple[np.ndarray, float, float]:
    """Coarse-to-fine `register`: one run of `steps` per downscale factor (coarse first, each from the previous
    level's best pose, learning rate lr x factor / factors[-1]: a coarse level takes larger steps over a smoother
    loss). Returns (OpenCV c2w (4,4), L1 at the finest level before, after)."""
    if not factors or any(int(f) < 1 for f in factors):
        raise ValueError(f"bench splat: --register-downscale needs factors >= 1 (coarse to fine), got {factors}")
    fine_K, fine_image = downscaled(K, image, int(factors[-1]))
    _, before, _ = register(model, c2w_cv, fine_K, fine_image, 0, lr)
    c2w, after = c2w_cv, before
    for f in factors:
        c2w, _, after = register(model, c2w, *downscaled(K, image, int(f)), steps, lr * f / factors[-1])
    if after > before:   # the coarse levels made the finest level worse: keep the initial pose
        return np.array(c2w_cv, np.float64, copy=True), before, before
    return c2w, before, after


@torch.no_grad()
def image_metrics(model, c2w_cv: np.ndarray, K: np.ndarray, image: torch.Tensor) -> dict:
    """splatfacto's own PSNR / SSIM / LPIPS of the render at `c2w_cv` against `image` ([H,W,3] float)."""
    H, W = image.shape[:2]
    cam = ns_camera(torch.from_numpy(cv.opencv_to_opengl_c2w(c2w_cv)[:3]), K, H, W)
    outputs = model.get_outputs(cam.to(model.device))
    metrics, _ = model.get_image_metrics_and_images(outputs, {"image": image.to(model.device)})
    return {k: float(metrics[k]) for k in ("psnr", "ssim", "lpips")}


def evaluate(pipeline, case: dict, cfg: SplatBenchConfig) -> dict:
    """Held-out metrics of one trained row: unregistered and registered (means over the held-out views)."""
    model = pipeline.model
    train_gt = np.stack([v["c2w"] for v in case["train"]])
    test_gt = np.stack([v["c2w"] for v in case["test"]])
    trained = trained_train_c2w(pipeline)
    init = map_held_out(trained, train_gt, test_gt)
    cams = pipeline.datamanager.train_dataset.cameras
    f_ratio = float(torch.median(torch.sqrt(cams.fx * cams.fy).flatten().double().cpu()
                                 / torch.tensor([math.sqrt(v["K"][0, 0] * v["K"][1, 1]) for v in case["train"]])))
    per = []
    for v, c2w in zip(case["test"], init):
        image = torch.from_numpy(v["rgb"]).float() / 255.0  # [H, W, 3]
        K = np.array(v["K"], np.float64, copy=True)
        K[:2, :2] *= f_ratio   # the splat's focal scale: median (trained / GT) focal of the training cameras
        before = image_metrics(model, c2w, K, image)
        reg, l1_0, l1_1 = register_pyramid(model, c2w, K, image, cfg.register_downscale, cfg.register_steps,
                                           cfg.register_lr)
        after = image_metrics(model, reg, K, image)
        per.append(dict(unreg=before, reg=after, l1_before=l1_0, l1_after=l1_1))
    mean = lambda key, m: float(np.mean([p[key][m] for p in per]))  # noqa: E731
    out = {f"{m}": mean("reg", m) for m in ("psnr", "ssim", "lpips")}
    out.update({f"{m}_unreg": mean("unreg", m) for m in ("psnr", "ssim", "lpips")})
    out["l1_before"] = float(np.mean([p["l1_before"] for p in per]))
    out["l1_after"] = float(np.mean([p["l1_after"] for p in per]))
    pm = pose_metrics(trained, train_gt)   # the training cameras after training (refined where the row refines)
    out["train_rra_deg"], out["train_ate_pct"] = pm["rra_mean_deg"], pm["ate_pct"]
    return out


# ---------------------------------------------------------------------------------------------------- run
def run_case(seed: int, n_train: int, cfg: SplatBenchConfig, work: Path) -> list[dict]:
    """All rows of one case."""
    H, W = parse_hw(cfg.size)
    case = make_case(seed, n_train, cfg.held_out, H, W, cfg.baseline)
    root = work / f"scene{seed}_n{n_train}"
    photos = write_photos(root / "photos", case["train"])
    names = [p.name for p in photos]
    rows, folders, n_seeds = [], {}, 0
    if "gt" in cfg.rows:
        folders["gt"] = save_folder(root / "gt", gt_reconstruction(case["train"], names), photos)
    t_dust3r = math.nan
    if any(r != "gt" for r in cfg.rows):
        t0 = time.perf_counter()
        rec = dust3r_reconstruction(photos, Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None, cfg.full_frame,
                                    cfg.model)
        t_dust3r = time.perf_counter() - t0
        folders["dust3r"] = save_folder(root / "dust3r", rec, photos)
        n_seeds = len(rec.pointcloud(max_points=cfg.max_points)[0])
    for row in cfg.rows:
        data = folders["gt" if row == "gt" else "dust3r"]
        tc = trainer_config(data, root / "outputs", row, cfg.iterations, cfg.max_points, n_seeds, cfg.footprint_scale,
                            cfg.downscales)
        torch.manual_seed(0)   # every row starts from the same random state (random points, quaternions)
        pipeline, seconds = train(tc)
        t0 = time.perf_counter()
        res = evaluate(pipeline, case, cfg)
        res.update(case=f"{seed}:{n_train}", scene=seed, views=n_train, row=row, size=cfg.size,
                   iterations=cfg.iterations, train_s=seconds, eval_s=time.perf_counter() - t0,
                   dust3r_s=t_dust3r if row != "gt" else math.nan,
                   gaussians=int(pipeline.model.num_points), camera_opt=pipeline.model.camera_optimizer.config.mode,
                   footprint_scale=pipeline.model.config.footprint_scale,
                   downscales=pipeline.model.config.num_downscales, full_frame=bool(cfg.full_frame) and row != "gt",
                   model=(cfg.model or "bundled") if row != "gt" else "",
                   train_names=names, held_out=[f"arc_{k:02d}" for k in case["test_idx"]],
                   train_arc=[f"arc_{k:02d}" for k in case["train_idx"]],
                   protocol=protocol(cfg))
        rows.append(res)
        print(_fmt(res), flush=True)
        del pipeline
    return rows


def run(cfg: SplatBenchConfig) -> list[dict]:
    """Every case and row; prints a table and the per-row means over cases; returns the rows."""
    cfg = cfg.effective()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    unknown = [r for r in cfg.rows if r not in ROWS]
    if unknown:
        raise ValueError(f"bench splat: unknown rows {unknown}; use {', '.join(ROWS)}")
    cases = []
    for c in cfg.cases:
        try:
            seed, n = (int(x) for x in c.split(":"))
        except ValueError:
            raise ValueError(f"bench splat: a case looks like SEED:VIEWS (e.g. 3:8), got {c!r}") from None
        cases.append((seed, n))
    tmp = None
    if cfg.work_dir:
        work = Path(cfg.work_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_splat_")
        work = Path(tmp.name)
    t0 = time.perf_counter()
    print(f"bench splat: {len(cases)} cases x {len(cfg.rows)} rows, {cfg.size}, {cfg.iterations} iterations, "
          f"DUSt3R {cfg.model or 'bundled model'} on {'full frames' if cfg.full_frame else 'the reference crop'}, "
          f"protocol: {protocol(cfg)}",
          flush=True)
    rows = []
    try:
        for seed, n in cases:
            rows += run_case(seed, n, cfg, work)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(summary(rows))
    print(f"bench splat: total {time.perf_counter() - t0:.0f}s")
    if cfg.json_out:
        atomic_write(cfg.json_out, lambda p: p.write_text(json.dumps(dict(config=cfg.__dict__, rows=rows), indent=1)),
                     "bench json")
    return rows


def protocol(cfg: SplatBenchConfig) -> str:
    """The evaluation protocol of `cfg` in words (stored with every row)."""
    return PROTOCOL.format(steps=cfg.register_steps, down=", 1/".join(str(f) for f in cfg.register_downscale),
                           lr=cfg.register_lr)


def summary(rows: list[dict]) -> str:
    """Per-row means over the cases, and each row's PSNR gap to `gt` (registered protocol)."""
    lines = ["mean over cases (registered | unregistered):"]
    gt = [r["psnr"] for r in rows if r["row"] == "gt"]
    for name in ROWS:
        rs = [r for r in rows if r["row"] == name]
        if not rs:
            continue
        m = lambda k: statistics.fmean(r[k] for r in rs)  # noqa: E731
        gap = f" gap to gt {m('psnr') - statistics.fmean(gt):+.2f} dB" if gt and len(gt) == len(rs) else ""
        lines.append(f"  {name:14s} PSNR {m('psnr'):6.2f} SSIM {m('ssim'):.3f} LPIPS {m('lpips'):.3f} | PSNR "
                     f"{m('psnr_unreg'):6.2f} SSIM {m('ssim_unreg'):.3f}  train {m('train_s'):6.1f}s  "
                     f"gaussians {m('gaussians'):7.0f}{gap}")
    return "\n".join(lines)


def _fmt(r: dict) -> str:
    return (f"{r['case']:>6s} {r['row']:14s} PSNR {r['psnr']:6.2f} SSIM {r['ssim']:.3f} LPIPS {r['lpips']:.3f} "
            f"(unregistered {r['psnr_unreg']:6.2f} / {r['ssim_unreg']:.3f}; L1 {r['l1_before']:.4f}->"
            f"{r['l1_after']:.4f}; train cameras RRA {r['train_rra_deg']:.2f} deg ATE {r['train_ate_pct']:.1f}%)  "
            f"train {r['train_s']:6.1f}s eval {r['eval_s']:5.1f}s gaussians {r['gaussians']:6d} "
            f"camera_opt {r['camera_opt']}")


def main(argv: list[str] | None = None) -> None:
    import tyro

    run(tyro.cli(SplatBenchConfig, args=argv))


if __name__ == "__main__":
    main()
