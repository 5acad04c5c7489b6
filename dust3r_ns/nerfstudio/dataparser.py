"""nerfstudio dataparser `dust3r`: a folder of unposed photos -> DUSt3R cameras, intrinsics and seed points.

`--data` is a folder of photos. The parser runs pair inference + global alignment (or reuses a cached result, see
`scene_cache`) and returns `DataparserOutputs` with
- `Cameras`: OpenGL camera-to-world, per-image pinhole intrinsics in ORIGINAL-image pixels with nerfstudio's pixel
  centres at +0.5 (what nerfstudio loads: the photos themselves, or upright PNG copies from the cache when a photo
  has an EXIF rotation or a format/mode nerfstudio's loader mishandles);
- orientation / centring / scaling as nerfstudio's COLMAP parser: world axes (x, y, z) -> (x, z, -y) (DUSt3R's
  world is a y-down OpenCV frame), `auto_orient_and_center_poses`, then translations scaled by 1 / max|t|.
  `dataparser_transform` (3x4) maps the reconstruction's world (`reconstruction.npz` in the cache entry) to the
  nerfstudio world before the scale `dataparser_scale`;
- `metadata["points3D_xyz"]` float32 (M,3) in the same frame and `metadata["points3D_rgb"]` uint8 (M,3): splatfacto
  seeds its Gaussians from them.

Keep this module free of datamanager/pipeline/model imports: nerfstudio imports dataparser entry points while its
own config module is still initialising (circular import otherwise).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Type

import numpy as np
import torch

from nerfstudio.cameras import camera_utils
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.data.utils.dataparsers_utils import (
    get_train_eval_split_all,
    get_train_eval_split_fraction,
    get_train_eval_split_interval,
)
from nerfstudio.plugins.registry_dataparser import DataParserSpecification

from dust3r_ns import conventions as cv
from dust3r_ns.align import AlignConfig
from dust3r_ns.pipeline import (Network, NetworkConfig, Pairs, PairsConfig, Points, PointsConfig,
                                default_model_source, resolve_device, run_pairs)
from dust3r_ns.pipeline import Cameras as KnownCameras  # (nerfstudio's `Cameras` is the camera batch class)
from dust3r_ns.pipeline import CamerasConfig, Masks, MasksConfig, align_inputs, inputs_fingerprint, masks_folder
from dust3r_ns.masks import mask_file
from dust3r_ns.nerfstudio.scene_cache import (
    CachedScene,
    SceneError,
    default_cache_dir,
    list_images,
    load_or_build,
    model_identity,
)

@dataclass
class Dust3rDataParserConfig(DataParserConfig):
    """Photos folder -> DUSt3R reconstruction (cached) -> nerfstudio cameras and seed points."""

    _target: Type = field(default_factory=lambda: Dust3rDataParser)
    data: Path = Path()
    """Folder of photos (at least 2; sub-folders and hidden files are ignored)."""
    network: Network = NetworkConfig()
    """DUSt3R checkpoint and device (--model, --device, --batch-size, --amp)."""
    pairs: Pairs = PairsConfig()
    """Network image size and pair graph (--image-size, --scene-graph)."""
    align: AlignConfig = AlignConfig()
    """Global alignment (--align.mode, --align.niter, --align.shared-focal, ...)."""
    points: Points = PointsConfig()
    """Seed points: confidence threshold (also stored with the reconstruction) and point cap."""
    cameras: KnownCameras = CamerasConfig()
    """Known cameras fixed in the alignment (--focal, --cameras, --cameras-fix)."""
    masks: Masks = MasksConfig()
    """Photo masks (--masks; default <data>/masks/<stem>.png, 0 = ignore): alignment weights, seed points, loss."""
    cache_dir: Optional[Path] = None
    """Reconstruction cache folder; None = <data>/.dust3r_cache (or ~/.cache/dust3r_ns/nerfstudio if read-only)."""
    use_cache: bool = True
    """Reuse a cached reconstruction of the same photos, model and options (False = always recompute)."""
    orientation_method: Literal["pca", "up", "vertical", "none"] = "up"
    """How to orient the scene (as the COLMAP parser)."""
    center_method: Literal["poses", "focus", "none"] = "poses"
    """How to centre the scene (as the COLMAP parser)."""
    auto_scale_poses: bool = True
    """Scale camera positions into [-1, 1] (as the COLMAP parser; by the points if the cameras barely move)."""
    scale_factor: float = 1.0
    """Extra scale applied to camera positions and points."""
    scene_scale: float = 1.0
    """Half-size of the scene box."""
    eval_mode: Literal["fraction", "interval", "all"] = "interval"
    """Train/eval split: every eval_interval-th photo held out, a fraction, or all photos in both."""
    train_split_fraction: float = 0.9
    """Fraction of photos used for training when eval_mode is 'fraction'."""
    eval_interval: int = 8
    """Every n-th photo is an eval photo when eval_mode is 'interval'."""


class Dust3rDataParser(DataParser):
    """Runs (or reuses) the DUSt3R reconstruction of `config.data` and exposes it to nerfstudio."""

    config: Dust3rDataParserConfig

    def __init__(self, config: Dust3rDataParserConfig):
        super().__init__(config=config)
        self.scene: Optional[CachedScene] = None
        self.points_src: Optional[np.ndarray] = None
        """(M,3) int64 (image index in the photo list, v, u network pixel) of each seed point (last call)."""
        self.split_photo_indices: Optional[np.ndarray] = None
        """Photo indices of the last split returned."""

    # ------------------------------------------------------------------ reconstruction
    def _options(self) -> dict:
        """The options that change the reconstruction (part of the cache key; device and budgets are not)."""
        c = self.config
        align = {k: v for k, v in dataclasses.asdict(c.align).items() if k not in ("device", "memory_limit_bytes")}
        return {"pairs": dataclasses.asdict(c.pairs), "align": align, "conf_thr": c.points.conf_thr,
                "amp": c.network.amp, **self._inputs_options()}

    def _mask_dir(self) -> Optional[Path]:
        return masks_folder(self.config.masks, [], photo_folder=Path(self.config.data))

    def _inputs_options(self) -> dict:
        """Known cameras and masks (options and file contents): part of the cache key when used."""
        c = self.config
        if c.cameras == CamerasConfig() and self._mask_dir() is None:
            return {}
        names = [p.name for p in sorted(Path(c.data).iterdir())] if Path(c.data).is_dir() else []
        return {"inputs": inputs_fingerprint(c.cameras, self._mask_dir(), names)}

    def _build(self, model: str, paths: list[Path]):
        c = self.config
        network = dataclasses.replace(c.network, model=model, device=resolve_device(c.network.device))
        print(f"dust3r: reconstructing {len(paths)} photos on {network.device} (cached afterwards)", file=sys.stderr)
        preds = run_pairs([str(p) for p in paths], network, c.pairs)
        try:
            rec = align_inputs(preds, c.align, c.points, c.cameras, c.masks, network.device,
                               photo_folder=Path(c.data))
        except ValueError as e:  # AlignError / ReconstructionError: unusable predictions
            raise SceneError(f"{c.data}: global alignment failed ({e}); the model's predictions for these photos are "
                             "unusable: check --model (the bundled model only knows synthetic scenes), the photos' "
                             "overlap, or try --align.mode baseline") from e
        del preds
        if network.device.startswith("cuda"):
            torch.cuda.empty_cache()  # give the network's memory back before splatting starts
        return rec

    def get_scene(self) -> CachedScene:
        """The (cached) reconstruction of the photo folder; computed once per parser."""
        if self.scene is None:
            c = self.config
            photos = list_images(Path(c.data))
            model = c.network.model or default_model_source()
            cache_dir = Path(c.cache_dir) if c.cache_dir is not None else default_cache_dir(Path(c.data))
            self.scene = load_or_build(photos, cache_dir, model_identity(model), self._options(),
                                       lambda paths: self._build(model, paths), use_cache=c.use_cache)
        return self.scene

    # ------------------------------------------------------------------ nerfstudio frame
    def _split_indices(self, files: list[Path], split: str) -> np.ndarray:
        c = self.config
        if c.eval_mode == "fraction":
            i_train, i_eval = get_train_eval_split_fraction(files, c.train_split_fraction)
        elif c.eval_mode == "interval":
            i_train, i_eval = get_train_eval_split_interval(files, c.eval_interval)
        elif c.eval_mode == "all":
            i_train, i_eval = get_train_eval_split_all(files)
        else:
            raise SceneError(f"unknown eval_mode {c.eval_mode!r}; use fraction, interval or all")
        if split == "train":
            return np.asarray(i_train, dtype=np.int64)
        if split in ("val", "test"):
            return np.asarray(i_eval, dtype=np.int64)
        raise SceneError(f"unknown split {split!r}; expected train, val or test")

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        c = self.config
        scene = self.get_scene()
        rec = scene.rec

        # poses: OpenCV -> OpenGL camera axes, world permutation, orientation + centring, scale
        c2w_gl = cv.opencv_to_opengl_c2w(np.asarray(rec.c2w, dtype=np.float64))
        poses = torch.from_numpy(cv.OPENCV_TO_ZUP_WORLD @ c2w_gl).float()
        poses, orient = camera_utils.auto_orient_and_center_poses(
            poses, method=c.orientation_method, center_method=c.center_method)
        transform = orient.double().numpy() @ cv.OPENCV_TO_ZUP_WORLD  # (3,4): reconstruction world -> nerfstudio world
        conf_thr = c.points.conf_thr
        xyz, rgb, src = rec.pointcloud(conf_thr=conf_thr, max_points=c.points.max_points or None)
        if len(xyz) < 4:
            raise SceneError(f"{c.data}: only {len(xyz)} reconstructed points have confidence > {conf_thr}; "
                             "lower --conf-thr (after the dust3r subcommand) or add overlapping photos")
        xyz_t = np.asarray(xyz, dtype=np.float64) @ transform[:, :3].T + transform[:, 3]
        scale = 1.0
        if c.auto_scale_poses:
            extent = float(torch.max(torch.abs(poses[:, :3, 3])))
            pts_extent = float(np.percentile(np.abs(xyz_t), 95))
            if extent < 1e-3 * pts_extent:  # cameras (almost) at one spot, e.g. pure rotation: use the points
                extent = pts_extent
            extent = extent if extent > 0 else 1.0
            scale /= extent
        scale *= c.scale_factor
        poses[:, :3, 3] *= scale
        xyz_t *= scale

        # intrinsics in original-image pixels, nerfstudio's pixel centres (+0.5)
        K = cv.K_to_colmap(np.asarray(rec.K_orig, dtype=np.float64))
        sizes = np.asarray(rec.orig_sizes, dtype=np.int64)
        idx = self._split_indices(scene.image_files, split)
        sel = torch.from_numpy(idx)
        cameras = Cameras(
            camera_to_worlds=poses[sel, :3, :4],
            fx=torch.from_numpy(K[idx, 0, 0]).float()[:, None],
            fy=torch.from_numpy(K[idx, 1, 1]).float()[:, None],
            cx=torch.from_numpy(K[idx, 0, 2]).float()[:, None],
            cy=torch.from_numpy(K[idx, 1, 2]).float()[:, None],
            width=torch.from_numpy(sizes[idx, 0])[:, None],
            height=torch.from_numpy(sizes[idx, 1])[:, None],
            camera_type=CameraType.PERSPECTIVE,
        )
        self.points_src = src
        self.split_photo_indices = idx
        s = float(c.scene_scale)
        mask_dir = Path(rec.meta["masks_dir"]) if rec.image_masks is not None and "masks_dir" in rec.meta else None
        return DataparserOutputs(
            image_filenames=[scene.image_files[i] for i in idx],
            mask_filenames=[mask_file(mask_dir, rec.names[i]) for i in idx] if mask_dir is not None else None,
            cameras=cameras,
            scene_box=SceneBox(aabb=torch.tensor([[-s, -s, -s], [s, s, s]], dtype=torch.float32)),
            metadata={
                "points3D_xyz": torch.from_numpy(xyz_t.astype(np.float32)),
                "points3D_rgb": torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.uint8)),
            },
            dataparser_transform=torch.from_numpy(transform).float(),
            dataparser_scale=scale,
        )


dust3r_dataparser = DataParserSpecification(
    config=Dust3rDataParserConfig(),
    description="Unposed photos -> DUSt3R poses, intrinsics and seed points (cached reconstruction).",
)
