"""nerfstudio dataparser `dust3r`: a folder of unposed photos -> DUSt3R cameras, intrinsics and seed points.

`--data` is a folder of photos, or a `dust3r-ns reconstruct` output folder (or its `reconstruction.npz`). For
photos the parser runs pair inference + global alignment, or reuses the cached result (`dust3r_ns.cache`, the cache
`dust3r-ns reconstruct` uses too); a reconstruction folder is reused as it is, without the network. It returns
`DataparserOutputs` with
- `Cameras`: OpenGL camera-to-world, per-image pinhole intrinsics with nerfstudio's pixel centres at +0.5, for
  the images nerfstudio loads: the photos themselves (8-bit RGB PNG copies from the cache for photos that are not
  upright 8-bit RGB JPEG/PNG files), or the folder's `images/`; downscaled by `downscale_factor` (None:
  nerfstudio's automatic choice, long side <= 1600 px) into `images_<f>/` with size floor(W/f) x floor(H/f) and
  the intrinsics of that resize (scale floor(W/f)/W, floor(H/f)/H in pixel-edge coordinates);
- orientation / centring / scaling as nerfstudio's COLMAP parser: world axes (x, y, z) -> (x, z, -y) (DUSt3R's
  world is a y-down OpenCV frame), `auto_orient_and_center_poses`, then translations scaled by 1 / max|t|.
  `dataparser_transform` (3x4) maps the reconstruction's world (`reconstruction.npz` in the cache entry) to the
  nerfstudio world before the scale `dataparser_scale`;
- `metadata["points3D_xyz"]` float32 (M,3) in the same frame and `metadata["points3D_rgb"]` uint8 (M,3): splatfacto
  seeds its Gaussians from them; `metadata["points3D_footprint"]` float32 (M,): each seed's pixel footprint in the
  training images (camera-frame depth x `dataparser_scale` / focal of its image, nerfstudio world units), which
  `dust3r-splatfacto` turns into initial Gaussian scales when `--pipeline.model.footprint-scale` is > 0.

Keep this module free of datamanager/pipeline/model imports: nerfstudio imports dataparser entry points while its
own config module is still initialising (circular import otherwise).
"""

from __future__ import annotations

import dataclasses
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
from dust3r_ns.images import auto_downscale, downscale_size
from dust3r_ns.pipeline import Cameras as KnownCameras  # (nerfstudio's `Cameras` is the camera batch class)
from dust3r_ns.pipeline import (CamerasConfig, Masks, MasksConfig, Network, NetworkConfig, Pairs, PairsConfig, Points,
                                PointsConfig, Video, default_model_source, inputs_fingerprint, masks_folder)
from dust3r_ns.video import VideoConfig, frames_folder, is_video
from dust3r_ns.cache import (
    Cache,
    CacheConfig,
    CachedScene,
    SceneError,
    build_reconstruction,
    cache_dir_for,
    downscaled_files,
    downscaled_masks,
    find_reconstruction,
    list_images,
    load_or_build,
    model_identity,
    open_reconstruction,
    reconstruction_options,
)

@dataclass
class Dust3rDataParserConfig(DataParserConfig):
    """Photos folder -> DUSt3R reconstruction (cached) -> nerfstudio cameras and seed points."""

    _target: Type = field(default_factory=lambda: Dust3rDataParser)
    data: Path = Path()
    """Folder of photos (at least 2; sub-folders and hidden files ignored), a video clip (its sampled frames), or a
    reconstruct output folder / its reconstruction.npz (reused without the network)."""
    network: Network = NetworkConfig()
    """DUSt3R checkpoint and device (--model, --device, --batch-size, --amp)."""
    pairs: Pairs = PairsConfig()
    """Network image size and pair graph (--image-size, --scene-graph)."""
    align: AlignConfig = AlignConfig()
    """Global alignment (--align.mode, --align.niter, --align.shared-focal, ...)."""
    video: Video = VideoConfig()
    """Frame sampling when `data` is a video clip (--fps, --num-frames, --min-sharpness)."""
    points: Points = PointsConfig()
    """Seed points: confidence threshold (also stored with the reconstruction) and point cap."""
    cameras: KnownCameras = CamerasConfig()
    """Known cameras fixed in the alignment (--focal, --cameras, --cameras-fix)."""
    masks: Masks = MasksConfig()
    """Photo masks (--masks; default <data>/masks/<stem>.png, 0 = ignore): alignment weights, seed points, loss."""
    cache: Cache = CacheConfig()
    """Reconstruction cache shared with dust3r-ns reconstruct (--cache-dir, --use-cache)."""
    downscale_factor: Optional[int] = None
    """Train on images reduced by this factor (images_<f>/, written when missing); None: nerfstudio's choice."""
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
    def _photos(self) -> Path:
        """The photo folder: `data`, or the folder of a video clip's sampled frames (extracted once)."""
        data = Path(self.config.data)
        return frames_folder(data, self.config.video) if is_video(data) else data

    def _pairs(self) -> PairsConfig:
        """The pairs options; a video clip's frames are ordered input."""
        c = self.config
        return dataclasses.replace(c.pairs, ordered=True) if is_video(Path(c.data)) else c.pairs

    def _mask_dir(self) -> Optional[Path]:
        return masks_folder(self.config.masks, [], photo_folder=self._photos())

    def _inputs_options(self) -> Optional[dict]:
        """Known cameras and masks (options and file contents): part of the cache key when used."""
        c = self.config
        if c.cameras == CamerasConfig() and self._mask_dir() is None:
            return None
        folder = self._photos()
        names = [p.name for p in sorted(folder.iterdir())] if folder.is_dir() else []
        return inputs_fingerprint(c.cameras, self._mask_dir(), names)

    def _build(self, model: str, paths: list[Path], cache_dir: Path):
        c = self.config
        return build_reconstruction(paths, dataclasses.replace(c.network, model=model), self._pairs(), c.align,
                                    c.points, label=str(c.data), cameras=c.cameras, masks=c.masks,
                                    photo_folder=self._photos(), store_dir=cache_dir)

    def get_scene(self) -> CachedScene:
        """The reconstruction of `data`: a saved one, or the (cached) one of the photo folder; once per parser."""
        if self.scene is None:
            c = self.config
            npz = find_reconstruction(Path(c.data))
            if npz is not None:
                self.scene = open_reconstruction(npz)
                return self.scene
            photos = list_images(self._photos())
            model = c.network.model or default_model_source()
            options = reconstruction_options(c.network, self._pairs(), c.align, c.points, self._inputs_options())
            cache_dir = cache_dir_for(photos, c.cache)
            self.scene = load_or_build(photos, cache_dir, model_identity(model), options,
                                       lambda paths: self._build(model, paths, cache_dir), use_cache=c.cache.use_cache)
        return self.scene

    def downscale(self) -> int:
        """The downscale factor: as configured, else nerfstudio's automatic choice for the images' sizes."""
        f = self.config.downscale_factor
        if f is not None and f < 1:
            raise SceneError(f"--downscale-factor must be >= 1 (1 = full resolution), got {f}")
        return int(f) if f is not None else auto_downscale(np.asarray(self.get_scene().rec.orig_sizes))

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

        # intrinsics of the (downscaled) images nerfstudio loads, nerfstudio's pixel centres (+0.5)
        factor = self.downscale()
        orig = np.asarray(rec.orig_sizes, dtype=np.int64)
        sizes = np.array([downscale_size(tuple(s), factor) for s in orig], dtype=np.int64)
        resize = np.concatenate([sizes / orig, np.zeros_like(sizes, dtype=np.float64)], axis=1)  # (sx, sy, 0, 0)
        K = cv.K_to_colmap(cv.K_orig_to_net(np.asarray(rec.K_orig, dtype=np.float64), resize))
        files = downscaled_files(scene, factor)
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
        # pixel footprint of each seed point in the training images: camera-frame depth / focal, nerfstudio units
        focal = np.sqrt(K[:, 0, 0] * K[:, 1, 1])  # (N,) training-image focal in pixels
        depth = np.zeros(len(src), dtype=np.float64)  # (M,)
        for k in np.unique(src[:, 0]):
            sel = src[:, 0] == k
            depth[sel] = rec.depths[k][src[sel, 1], src[sel, 2]]
        footprint = depth * scale / focal[src[:, 0]]  # (M,)
        self.points_src = src
        self.split_photo_indices = idx
        s = float(c.scene_scale)
        mask_dir = Path(rec.meta["masks_dir"]) if rec.image_masks is not None and "masks_dir" in rec.meta else None
        masks = downscaled_masks(scene, mask_dir, factor) if mask_dir is not None else None
        return DataparserOutputs(
            image_filenames=[files[i] for i in idx],
            mask_filenames=[masks[i] for i in idx] if masks is not None else None,
            cameras=cameras,
            scene_box=SceneBox(aabb=torch.tensor([[-s, -s, -s], [s, s, s]], dtype=torch.float32)),
            metadata={
                "points3D_xyz": torch.from_numpy(xyz_t.astype(np.float32)),
                "points3D_rgb": torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.uint8)),
                "points3D_footprint": torch.from_numpy(footprint.astype(np.float32)),
            },
            dataparser_transform=torch.from_numpy(transform).float(),
            dataparser_scale=scale,
        )


dust3r_dataparser = DataParserSpecification(
    config=Dust3rDataParserConfig(),
    description="Unposed photos -> DUSt3R poses, intrinsics and seed points (cached reconstruction).",
)
