"""Video input: a clip becomes a folder of sharp frames, sampled at a rate or to a count, named so they sort.

Frames are decoded with PyAV (FFmpeg bundled in its wheels; no system ffmpeg). The clip's duration is cut into
equal windows, one per wanted frame (`fps` per second, or `num_frames` over the clip); from each window the
sharpest frame is kept, sharpness being the variance of the Laplacian of the grey image (a blurred frame has little
high-frequency energy). A window whose sharpest frame is still below `min_sharpness` x the median sharpness of the
kept frames is dropped (motion blur through the whole window). The frames are written upright as 8-bit RGB PNGs
`frame_00000.png`, ... into a folder that appears atomically and is reused while the clip and the sampling options
are unchanged (`manifest.json` records both).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from dust3r_ns.fileio import atomic_dir

VIDEO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm"}
FRAMES_KIND = "dust3r_ns.video_frames"


class VideoError(ValueError):
    """A video that cannot be read or sampled (one line: the file, the problem, the fix)."""


@dataclass(frozen=True)
class VideoConfig:
    """How frames are taken from a video input."""

    fps: Optional[float] = None
    """Frames per second of video to keep; None: `num_frames` frames over the whole clip."""
    num_frames: int = 50
    """Frames to keep when `fps` is not given (fewer if the clip is shorter)."""
    min_sharpness: float = 0.3
    """Drop a sampling window whose sharpest frame is below this fraction of the median sharpness (0: keep all)."""

    def __post_init__(self) -> None:
        if self.fps is not None and not self.fps > 0:
            raise VideoError(f"--fps must be > 0, got {self.fps}")
        if self.num_frames < 2:
            raise VideoError(f"--num-frames must be >= 2 (a reconstruction needs two views), got {self.num_frames}")
        if not 0 <= self.min_sharpness < 1:
            raise VideoError(f"--min-sharpness must lie in [0, 1), got {self.min_sharpness}")


def is_video(path: str | os.PathLike) -> bool:
    """True for a file with a video extension."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def sharpness(rgb: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image [H, W, 3] uint8 (after 2x2 averaging when large)."""
    g = rgb.astype(np.float32).mean(-1)
    while max(g.shape) > 640:
        h, w = (g.shape[0] // 2) * 2, (g.shape[1] // 2) * 2
        g = g[:h:2, :w:2] + g[1:h:2, :w:2] + g[:h:2, 1:w:2] + g[1:h:2, 1:w:2]
        g *= 0.25
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def _decode(path: Path) -> Iterator[tuple[float, np.ndarray]]:
    """(time in seconds, RGB [H, W, 3] uint8) of every frame, rotation metadata applied."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: has no video stream; pass a video clip or a folder of photos")
            stream = container.streams.video[0]
            tb = float(stream.time_base) if stream.time_base else 0.0
            for k, frame in enumerate(container.decode(stream)):
                t = float(frame.pts) * tb if frame.pts is not None and tb else k / float(stream.average_rate or 30)
                rgb = frame.to_ndarray(format="rgb24")
                rot = int(getattr(frame, "rotation", 0) or 0) % 360
                if rot:
                    rgb = np.ascontiguousarray(np.rot90(rgb, k=rot // 90))
                yield t, rgb
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: not a readable video ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                         "re-encode it (e.g. H.264 .mp4) or extract the frames as photos") from None


def sample_frames(path: str | os.PathLike, cfg: VideoConfig = VideoConfig()) -> list[tuple[float, np.ndarray]]:
    """The kept frames of a clip as (time, RGB) in time order (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such video file; check the path")
    frames = list(_decode(path))   # [(t, rgb)]
    if len(frames) < 2:
        raise VideoError(f"{path}: the clip has {len(frames)} frame(s); a reconstruction needs at least two")
    times = np.array([t for t, _ in frames])
    t0, t1 = float(times.min()), float(times.max())
    step = (t1 - t0) / (len(frames) - 1) if t1 > t0 else 1.0   # one frame's duration: the last frame counts
    span = t1 - t0 + step
    n = int(np.floor(span * cfg.fps + 1e-9)) if cfg.fps is not None else cfg.num_frames
    n = max(1, min(n, len(frames)))
    window = np.minimum(np.floor((times - t0) * n / span + 1e-9).astype(np.int64), n - 1)
    best: dict[int, tuple[float, int]] = {}
    for k, (w, (_, rgb)) in enumerate(zip(window, frames)):
        s = sharpness(rgb)
        if int(w) not in best or s > best[int(w)][0]:
            best[int(w)] = (s, k)
    kept = sorted(best.values(), key=lambda sk: sk[1])
    if cfg.min_sharpness > 0 and len(kept) > 2:
        med = float(np.median([s for s, _ in kept]))
        kept = [sk for sk in kept if sk[0] >= cfg.min_sharpness * med]
    if len(kept) < 2:
        raise VideoError(f"{path}: only {len(kept)} sharp frame(s) at this sampling; raise --fps/--num-frames or "
                         "lower --min-sharpness")
    return [frames[k] for _, k in kept]


def _clip_key(path: Path, cfg: VideoConfig) -> str:
    st = path.stat()
    ident = json.dumps({"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "options": asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def frames_folder(path: str | os.PathLike, cfg: VideoConfig = VideoConfig(), root: str | os.PathLike | None = None
                  ) -> Path:
    """A folder holding the clip's kept frames as PNGs, extracted once per clip and options.

    root: where the frame folders live (default: `.dust3r_frames/` next to the clip, or ~/.cache/dust3r_ns/frames
    when that folder is not writable)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such video file; check the path")
    if root is None:
        root = path.parent / ".dust3r_frames"
        if not os.access(path.parent, os.W_OK):
            root = Path.home() / ".cache" / "dust3r_ns" / "frames"
    out = Path(root) / f"{path.stem}_{_clip_key(path, cfg)}"
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text())
            if info.get("kind") == FRAMES_KIND and all((out / f).is_file() for f in info["frames"]):
                return out
        except (OSError, ValueError, KeyError, TypeError):
            pass
    frames = sample_frames(path, cfg)
    shutil.rmtree(out, ignore_errors=True)   # an incomplete or stale folder: its files must not mix with the new
    with atomic_dir(out, what="video frames", error=VideoError) as tmp:
        names = []
        for k, (_, rgb) in enumerate(frames):
            name = f"frame_{k:05d}.png"
            Image.fromarray(rgb).save(tmp / name, format="PNG")
            names.append(name)
        (tmp / "manifest.json").write_text(json.dumps(
            {"kind": FRAMES_KIND, "video": str(path), "options": asdict(cfg), "frames": names,
             "times": [round(t, 6) for t, _ in frames]}, indent=1))
    return out
