"""Binary little-endian PLY point clouds: `write_ply(path, xyz, rgb)` and a small `read_ply` for checks.

Layout: one `vertex` element with `float x, y, z` and `uchar red, green, blue` (what nerfstudio, open3d,
trimesh and 3DGS initialisation read).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..fileio import atomic_file
from ._common import ExportError

__all__ = ["write_ply", "read_ply"]

_VERTEX_DTYPE = np.dtype(
    [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
)

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def write_ply(path: str | os.PathLike, xyz: np.ndarray, rgb: np.ndarray | None = None) -> Path:
    """Write points (M, 3) and colours (M, 3) uint8 (or floats in [0, 1]) to a binary PLY, atomically."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ExportError(f"write_ply({path}): xyz must be (M, 3), got {xyz.shape}")
    if not np.all(np.isfinite(xyz)):
        raise ExportError(f"write_ply({path}): xyz contains NaN/inf; filter the points first")
    m = xyz.shape[0]
    if rgb is None:
        rgb = np.full((m, 3), 255, np.uint8)
    rgb = np.asarray(rgb)
    if rgb.shape != (m, 3):
        raise ExportError(f"write_ply({path}): rgb must be ({m}, 3), got {rgb.shape}")
    if rgb.dtype != np.uint8:
        if np.issubdtype(rgb.dtype, np.floating):
            rgb = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
        else:
            if rgb.size and (rgb.min() < 0 or rgb.max() > 255):
                raise ExportError(f"write_ply({path}): integer rgb must be in [0, 255]")
            rgb = rgb.astype(np.uint8)
    data = np.empty(m, _VERTEX_DTYPE)
    data["x"], data["y"], data["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    data["red"], data["green"], data["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment written by dust3r_ns\n"
        f"element vertex {m}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "end_header\n"
    ).encode("ascii")
    path = Path(path)
    with atomic_file(path, "PLY file", error=ExportError) as tmp:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data.tobytes())
    return path


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a binary little-endian PLY vertex element -> (xyz (M, 3) float32, rgb (M, 3) uint8 or None).

    Supports files whose first element is `vertex` with scalar properties (any order, extra properties ignored).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ExportError(f"cannot read PLY {path}: {e}") from e
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply") or end < 0:
        raise ExportError(f"{path} is not a PLY file (missing 'ply' magic or 'end_header')")
    lines = raw[:end].decode("ascii", errors="replace").splitlines()
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    for line in lines[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property":
            if not elements:
                raise ExportError(f"{path}: property before any element in the PLY header")
            if tok[1] == "list":
                raise ExportError(f"{path}: list properties are not supported by read_ply")
            if tok[1] not in _PLY_TYPES:
                raise ExportError(f"{path}: unknown PLY property type {tok[1]!r}")
            elements[-1][2].append((tok[2], "<" + _PLY_TYPES[tok[1]]))
    if fmt != "binary_little_endian":
        raise ExportError(f"{path}: only binary_little_endian PLY is supported (got {fmt})")
    if not elements or elements[0][0] != "vertex":
        raise ExportError(f"{path}: the first PLY element must be 'vertex'")
    _, count, props = elements[0]
    dtype = np.dtype(props)
    body = raw[end + len(b"end_header\n"):]
    if len(body) < count * dtype.itemsize:
        raise ExportError(f"{path}: truncated PLY ({len(body)} bytes for {count} vertices of {dtype.itemsize})")
    data = np.frombuffer(body, dtype=dtype, count=count)
    names = dtype.names or ()
    if not all(k in names for k in ("x", "y", "z")):
        raise ExportError(f"{path}: PLY vertices lack x, y, z")
    xyz = np.stack([data["x"], data["y"], data["z"]], axis=-1).astype(np.float32)
    rgb = None
    if all(k in names for k in ("red", "green", "blue")):
        rgb = np.stack([data["red"], data["green"], data["blue"]], axis=-1).astype(np.uint8)
    return xyz, rgb
