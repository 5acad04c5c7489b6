"""Checkpoint I/O for the DUSt3R network: official `.pth`, Hugging Face folders / hub names, CroCo initialisation.

Reading is defensive: `.pth` files go through `torch.load(weights_only=True)` with only `argparse.Namespace`
allow-listed, the constructor string stored in them is parsed with `ast` (never evaluated), names and shapes
are compared with the model before a strict load, and every failure is a one-line `CheckpointError` naming
the file and what to do. Writing is atomic (`fileio.atomic_write`: temporary file in the same folder, then
replaced).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..fileio import atomic_write

__all__ = [
    "CheckpointError",
    "MODEL_OPTIONS",
    "RawCheckpoint",
    "parse_model_spec",
    "format_model_spec",
    "model_spec",
    "inference_options",
    "compare_state_dict",
    "HUB_REPOS",
    "read_checkpoint",
    "build_model",
    "load_model",
    "load_state_dict_checked",
    "load_croco_init",
    "save_pth",
    "save_hf",
    "hub_folder",
]


class CheckpointError(ValueError):
    """A checkpoint cannot be read, parsed or loaded; the message is one line naming the file."""


# Keywords of the DUSt3R constructor (AsymmetricCroCo3DStereo) and of the CroCo pretraining network.
MODEL_CLASS = "AsymmetricCroCo3DStereo"
MODEL_OPTIONS: tuple[str, ...] = (
    "output_mode", "head_type", "depth_mode", "conf_mode", "freeze", "landscape_only", "patch_embed_cls",
    "img_size", "pos_embed", "enc_embed_dim", "enc_depth", "enc_num_heads", "dec_embed_dim", "dec_depth",
    "dec_num_heads", "mlp_ratio", "norm_im2_in_dec", "patch_size", "mask_ratio",
)
CROCO_CLASS = "CroCoNet"
CROCO_OPTIONS: tuple[str, ...] = (
    "img_size", "patch_size", "mask_ratio", "enc_embed_dim", "enc_depth", "enc_num_heads", "dec_embed_dim",
    "dec_depth", "dec_num_heads", "mlp_ratio", "norm_im2_in_dec", "pos_embed",
)
_CLASS_OPTIONS = {MODEL_CLASS: MODEL_OPTIONS, "DUSt3R": MODEL_OPTIONS, CROCO_CLASS: CROCO_OPTIONS}
# Order of the official constructor strings; other keys follow in MODEL_OPTIONS order.
_SPEC_ORDER = ("pos_embed", "patch_embed_cls", "img_size", "head_type", "output_mode", "depth_mode", "conf_mode",
               "enc_embed_dim", "enc_depth", "enc_num_heads", "dec_embed_dim", "dec_depth", "dec_num_heads")
_INT_OPTIONS = {"enc_embed_dim", "enc_depth", "enc_num_heads", "dec_embed_dim", "dec_depth", "dec_num_heads",
                "patch_size"}
_TUPLE_OPTIONS = {"img_size", "depth_mode", "conf_mode"}
_MAX_SPEC_LEN = 4096
_INF_NAMES = {"inf": math.inf, "Infinity": math.inf}
_INF_MODULES = {"math", "np", "numpy", "torch"}

HUB_REPOS = ("naver/DUSt3R_ViTLarge_BaseDecoder_224_linear", "naver/DUSt3R_ViTLarge_BaseDecoder_512_linear",
             "naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
_HF_CONFIG = "config.json"
_HF_WEIGHTS = "model.safetensors"


# --------------------------------------------------------------------------------------------------------------
# Constructor strings
# --------------------------------------------------------------------------------------------------------------

def _where(source: str | os.PathLike | None) -> str:
    return f" in {source}" if source is not None else ""


def _literal(node: ast.AST, source, key: str) -> Any:
    """Value of a literal AST node (numbers, strings, bools, None, tuples/lists, inf); anything else is refused."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (bool, int, float, str)) or node.value is None:
            return node.value
    elif isinstance(node, (ast.Tuple, ast.List)):
        items = [_literal(e, source, key) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand, source, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    elif isinstance(node, ast.Name) and node.id in _INF_NAMES:
        return _INF_NAMES[node.id]
    elif (isinstance(node, ast.Attribute) and node.attr == "inf" and isinstance(node.value, ast.Name)
          and node.value.id in _INF_MODULES):
        return math.inf
    try:
        text = ast.unparse(node)
    except Exception:  # pragma: no cover - unparse of a parsed node does not fail in practice
        text = type(node).__name__
    raise CheckpointError(
        f"refusing model spec{_where(source)}: option '{key}' is not a literal ({text[:80]!r}); "
        "only numbers, strings, booleans, None, tuples/lists and inf are accepted")


def _check_option_value(key: str, value: Any, source) -> Any:
    """Light type checks so that a bad value gives a clear error instead of a failure deep inside the network."""
    def bad(expected: str) -> CheckpointError:
        return CheckpointError(f"bad model option {key}={value!r}{_where(source)}: expected {expected}")

    if key in _TUPLE_OPTIONS and isinstance(value, list):
        value = tuple(value)
    if key in _INT_OPTIONS:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad("a positive integer")
    elif key == "img_size":
        if isinstance(value, int) and not isinstance(value, bool):
            if value <= 0:
                raise bad("a positive integer or (height, width)")
        elif not (isinstance(value, tuple) and len(value) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise bad("a positive integer or (height, width)")
    elif key in ("depth_mode", "conf_mode"):
        if not (isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], str)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[1:])):
            raise bad("a tuple (mode, vmin, vmax), e.g. ('exp', -inf, inf)")
    elif key in ("output_mode", "head_type", "freeze", "patch_embed_cls", "pos_embed"):
        if not isinstance(value, str):
            raise bad("a string")
    elif key in ("landscape_only", "norm_im2_in_dec"):
        if not isinstance(value, bool):
            raise bad("True or False")
    elif key in ("mlp_ratio", "mask_ratio"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
    return value


def _check_options(class_name: str, kwargs: Mapping[str, Any], source) -> dict[str, Any]:
    allowed = _CLASS_OPTIONS[class_name]
    out = {}
    for key, value in kwargs.items():
        if key not in allowed:
            raise CheckpointError(
                f"unknown model option '{key}'{_where(source)}; {class_name} accepts: {', '.join(allowed)}")
        out[key] = _check_option_value(key, value, source)
    return out


def parse_model_spec(spec: str, source: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]]:
    """Parse a constructor string such as ``AsymmetricCroCo3DStereo(img_size=(512, 512), ...)`` without eval.

    Returns ``(class_name, kwargs)``. The string must be one call to a known class (AsymmetricCroCo3DStereo,
    its alias DUSt3R, or CroCoNet) with keyword arguments only, whose values are literals or ``inf``.
    `source` (the file the string came from) is named in errors.
    """
    if not isinstance(spec, str):
        raise CheckpointError(f"model spec{_where(source)} is a {type(spec).__name__}, not a string")
    text = spec.strip()
    if len(text) > _MAX_SPEC_LEN:
        raise CheckpointError(f"model spec{_where(source)} is too long ({len(text)} characters)")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        msg = getattr(exc, "msg", None) or str(exc)
        raise CheckpointError(f"cannot parse model spec{_where(source)}: {msg} in {text[:120]!r}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise CheckpointError(
            f"refusing model spec{_where(source)}: expected one call like {MODEL_CLASS}(key=value, ...), "
            f"got {text[:120]!r}")
    name = call.func.id
    if name not in _CLASS_OPTIONS:
        raise CheckpointError(
            f"unknown model class '{name}'{_where(source)}; expected {MODEL_CLASS} (or {CROCO_CLASS} for a "
            "CroCo pretraining checkpoint)")
    if call.args:
        raise CheckpointError(f"refusing model spec{_where(source)}: positional arguments are not accepted")
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise CheckpointError(f"refusing model spec{_where(source)}: '**' arguments are not accepted")
        if kw.arg in kwargs:
            raise CheckpointError(f"cannot parse model spec{_where(source)}: option '{kw.arg}' given twice")
        kwargs[kw.arg] = _literal(kw.value, source, kw.arg)
    class_name = MODEL_CLASS if name == "DUSt3R" else name
    return class_name, _check_options(class_name, kwargs, source)


def _format_value(value: Any) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, tuple):
        inner = ", ".join(_format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    raise CheckpointError(f"cannot write model option value {value!r} ({type(value).__name__}) in a model spec")


def format_model_spec(kwargs: Mapping[str, Any], class_name: str = MODEL_CLASS) -> str:
    """The constructor string for `kwargs`, in the official format (official key order first, inf as `inf`)."""
    keys = [k for k in _SPEC_ORDER if k in kwargs] + [k for k in kwargs if k not in _SPEC_ORDER]
    return f"{class_name}(" + ", ".join(f"{k}={_format_value(kwargs[k])}" for k in keys) + ")"


def _model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"cannot save {type(model).__name__}: it has no `config` dict of constructor options")
    return dict(cfg)


def model_spec(model: nn.Module) -> str:
    """The official-format constructor string of `model` (from `model.config`)."""
    return format_model_spec(_model_config(model), MODEL_CLASS)


def inference_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What the reference loader does at inference: plain patch embedding and no landscape transposition."""
    out = dict(kwargs)
    if out.get("patch_embed_cls") == "ManyAR_PatchEmbed":
        out["patch_embed_cls"] = "PatchEmbedDust3R"
    out["landscape_only"] = False
    return out


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------

@dataclass
class RawCheckpoint:
    """The content of a checkpoint before it meets a model."""

    source: str                                   # file or folder, for messages
    state_dict: dict[str, torch.Tensor]
    class_name: str | None = None                 # None: the file carries no model spec (bare state dict)
    options: dict[str, Any] = field(default_factory=dict)
    args: argparse.Namespace | None = None        # `.pth` args (training options), if any
    entries: dict[str, Any] = field(default_factory=dict)   # other top-level `.pth` entries (epoch, optimizer...)
    aliases: dict[str, str] = field(default_factory=dict)   # name -> stored name (safetensors metadata)


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pickle_globals(path: Path, limit: int = 64 << 20) -> list[str]:
    """Globals a pickle refers to, found by parsing its opcodes (nothing is executed). Best effort."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not names:
                    return []
                data = zf.read(names[0])
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
        found: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL" and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
        return list(dict.fromkeys(found))
    except Exception:
        return []


# Globals of an ordinary checkpoint pickle (only used to word error messages; torch.load decides what loads).
_SAFE_GLOBAL = re.compile(
    r"^(collections\.OrderedDict|argparse\.Namespace|torch\.\w*Storage|torch\._utils\._rebuild_\w+"
    r"|torch\.(float|bfloat|half|double|int|uint|long|short|bool|complex)\w*|torch\.Size|torch\.device"
    r"|torch\.nn\.parameter\.Parameter|builtins\.(set|frozenset|bytearray|slice|complex))$")


@contextlib.contextmanager
def _namespace_allowed(path: Path):
    """Allow-list argparse.Namespace (and nothing else) for a weights-only load."""
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
        with torch.serialization.safe_globals([argparse.Namespace]):
            yield
    elif hasattr(torch.serialization, "add_safe_globals"):  # torch 2.4: process-wide, harmless for Namespace
        torch.serialization.add_safe_globals([argparse.Namespace])
        yield
    else:
        raise CheckpointError(
            f"cannot load {path} safely with torch {torch.__version__}: install torch >= 2.4 or use the Hugging "
            "Face folder (config.json + model.safetensors)")


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` with only argparse.Namespace added; failures become one-line errors."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); download it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _namespace_allowed(path):
                return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ValueError...
        message = str(exc)
        bad = [g for g in _pickle_globals(path) if not _SAFE_GLOBAL.match(g)]
        blocked = re.search(r"(?:unsupported|Unsupported) GLOBAL ([\w.]+)", message)
        if blocked or bad:
            names = ", ".join((bad or [blocked.group(1)])[:3])
            raise CheckpointError(
                f"refusing to load {path}: its pickle references {names}, which a weights-only load does not allow "
                "(it could run code); a checkpoint holds only tensors and plain values: use the official file or "
                "the Hugging Face safetensors files") from None
        if head.startswith(b"PK") or isinstance(exc, (EOFError, zipfile.BadZipFile)) or "zip" in message.lower():
            reason = "truncated or corrupted"
        elif head[:1] in (b"{", b"["):
            reason = "a JSON/text file, not a PyTorch checkpoint"
        else:
            reason = "not a PyTorch checkpoint"
        detail = message.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        detail = _one_line(detail if detail.strip() else type(exc).__name__, 100)
        raise CheckpointError(f"cannot load {path}: {reason} ({detail}); download it again or pass the right file"
                              ) from None


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                # own the memory: a tensor left on the file's mmap dies (SIGBUS) if the file is later truncated
                tensors[key] = f.get_tensor(key).clone()
    except Exception as exc:
        raise CheckpointError(
            f"cannot load {path}: not a valid safetensors file, or truncated ({_one_line(exc, 100)}); "
            "download it again") from None
    aliases = {k: v for k, v in metadata.items() if k not in tensors and v in tensors}
    return tensors, aliases


def _read_config_json(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot parse {path}: not valid JSON ({_one_line(exc, 100)})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"bad model config {path}: expected a JSON object of constructor options")
    return MODEL_CLASS, _check_options(MODEL_CLASS, cfg, path)


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} is not a model state dict: entry {str(bad[0])!r} is not a named tensor")
    return dict(obj)


def _read_pth(path: Path, strict_spec: bool = True) -> RawCheckpoint:
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict with a 'model' state dict")
    if "model" in obj and isinstance(obj["model"], Mapping):
        raw = RawCheckpoint(str(path), _state_dict_of(obj["model"], path))
        args = obj.get("args")
        spec = None
        if isinstance(args, argparse.Namespace):
            raw.args = args
            spec = getattr(args, "model", None)
        elif isinstance(args, Mapping):
            raw.args = argparse.Namespace(**{str(k): v for k, v in args.items()})
            spec = args.get("model")
        if spec is not None:
            try:
                raw.class_name, raw.options = parse_model_spec(spec, path)
            except CheckpointError:
                if strict_spec:
                    raise
        raw.entries = {k: v for k, v in obj.items() if k not in ("model", "args")}
        return raw
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return RawCheckpoint(str(path), _state_dict_of(obj, path))
    keys = ", ".join(map(str, list(obj)[:6]))
    raise CheckpointError(f"checkpoint {path} has no 'model' state dict (top-level keys: {keys})")


def _read_hf_folder(folder: Path, need_config: bool = True) -> RawCheckpoint:
    weights, config = folder / _HF_WEIGHTS, folder / _HF_CONFIG
    if not weights.is_file():
        others = sorted(p.name for p in folder.glob("*.safetensors")) + sorted(p.name for p in folder.glob("*.pth"))
        hint = f" (found: {', '.join(others[:4])}; pass that file)" if others else ""
        raise CheckpointError(f"{folder} has no {_HF_WEIGHTS}{hint}; a model folder holds {_HF_CONFIG} and {_HF_WEIGHTS}")
    return _read_safetensors_with_config(weights, config, need_config)


def _read_safetensors_with_config(weights: Path, config: Path, need_config: bool) -> RawCheckpoint:
    tensors, aliases = _read_safetensors(weights)
    raw = RawCheckpoint(str(weights), tensors, aliases=aliases)
    if config.is_file():
        raw.class_name, raw.options = _read_config_json(config)
    elif need_config:
        raise CheckpointError(
            f"{weights} has no {_HF_CONFIG} beside it; put the model's {_HF_CONFIG} in {weights.parent} "
            "or pass spec=/config=")
    return raw


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_folder(name: str) -> Path:
    """Download (or find in the Hugging Face cache) `config.json` and `model.safetensors` of hub repo `name`.

    Honours HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE as set at call time. Returns the local folder.
    """
    local = Path("checkpoints") / name.split("/")[-1]
    hint = (f"cannot download {name} (offline?); download it elsewhere and pass the local folder, e.g. put "
            f"{_HF_CONFIG} and {_HF_WEIGHTS} from https://huggingface.co/{name} in {local}/ and pass {local}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(hint + " (huggingface_hub is not installed)") from None
    offline = _env_flag("HF_HUB_OFFLINE")
    paths = []
    for filename in (_HF_CONFIG, _HF_WEIGHTS):
        try:
            paths.append(Path(hf_hub_download(repo_id=name, filename=filename, cache_dir=_hub_cache_dir(),
                                              local_files_only=offline)))
        except Exception as exc:  # offline, no network, unknown repo, gated repo, disk full...
            kind = type(exc).__name__
            if not offline and "Local" not in kind and ("NotFound" in kind or "Gated" in kind):
                raise CheckpointError(
                    f"cannot download {name}: the Hugging Face hub has no {filename} there, or the repo is private "
                    f"or gated [{kind}]; check the name (e.g. {HUB_REPOS[-1]}) or pass a local folder") from None
            raise CheckpointError(f"{hint} [{kind}]") from None
    return paths[1].parent


def _resolve(source: str | os.PathLike) -> tuple[str, Path | str]:
    """('folder'|'file', path) or ('hub', repo name) for a user-given source."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file():
        return "file", path
    name = text if "/" in text else (f"naver/{text}" if f"naver/{text}" in HUB_REPOS else None)
    if name and _HUB_NAME.match(name) and not name.startswith(("./", "../")) and path.suffix not in (
            ".pth", ".pt", ".ckpt", ".safetensors", ".bin", ".json"):
        return "hub", name
    raise CheckpointError(
        f"checkpoint not found: {text} (expected a .pth file, a folder with {_HF_CONFIG} and {_HF_WEIGHTS}, "
        "or a Hugging Face name like naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt)")


def read_checkpoint(source: str | os.PathLike, *, strict_spec: bool = True) -> RawCheckpoint:
    """Read a `.pth`, `.safetensors` (+ sibling config.json), HF folder or hub name, without building a model.

    With `strict_spec=False` a `.pth` constructor string that cannot be parsed is ignored (class_name None):
    weights-only users such as `load_croco_init` do not need it. The file itself is read as safely either way.
    """
    kind, path = _resolve(source)
    if kind == "hub":
        return _read_hf_folder(hub_folder(str(path)), need_config=False)
    if kind == "folder":
        return _read_hf_folder(path, need_config=False)
    assert isinstance(path, Path)
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return _read_safetensors_with_config(path, path.parent / _HF_CONFIG, need_config=False)
    return _read_pth(path, strict_spec)


# --------------------------------------------------------------------------------------------------------------
# Meeting a model
# --------------------------------------------------------------------------------------------------------------

def _network_class() -> type[nn.Module]:
    from dust3r_ns.model.network import AsymmetricCroCo3DStereo

    return AsymmetricCroCo3DStereo


def build_model(options: Mapping[str, Any], *, meta: bool = False, source=None) -> nn.Module:
    """Instantiate the network from constructor options (checked); `meta=True` allocates no memory."""
    options = _check_options(MODEL_CLASS, options, source)
    cls = _network_class()
    try:
        if meta:
            with torch.device("meta"):
                return cls(**options)
        return cls(**options)
    except Exception as exc:
        raise CheckpointError(
            f"cannot build {MODEL_CLASS}{_where(source)} from {format_model_spec(options)[:200]}: "
            f"{type(exc).__name__}: {_one_line(exc, 120)}") from None


def _shared_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are the same parameter/buffer object in `model` (module aliases)."""
    groups: dict[int, list[str]] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(p), []).append(name)
    keys = set(model.state_dict().keys())
    return [[n for n in g if n in keys] for g in groups.values() if len([n for n in g if n in keys]) > 1]


_DPT_ALIAS = re.compile(r"^(downstream_head[12]\.dpt\.scratch)\.layer_rn\.([0-3])\.weight$")


def _complete_state_dict(sd: dict[str, torch.Tensor], model: nn.Module,
                         aliases: Mapping[str, str] = ()) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Restore names stored once (aliases) and a missing second decoder; returns (state dict, copied names)."""
    sd = dict(sd)
    expected = model.state_dict().keys()
    missing = [k for k in expected if k not in sd]
    copied: list[str] = []
    if not missing:
        return sd, copied
    # 1) names the file says are stored under another name (safetensors metadata)
    for k in missing:
        if k in aliases and aliases[k] in sd:
            sd[k] = sd[aliases[k]]
    # 2) names that are the same tensor in the model
    for group in _shared_names(model):
        have = [n for n in group if n in sd]
        for n in group:
            if n not in sd and have:
                sd[n] = sd[have[0]]
    # 3) the documented DPT aliases, in case the model does not share the modules
    for k in [k for k in expected if k not in sd]:
        m = _DPT_ALIAS.match(k)
        if m and f"{m.group(1)}.layer{int(m.group(2)) + 1}_rn.weight" in sd:
            sd[k] = sd[f"{m.group(1)}.layer{int(m.group(2)) + 1}_rn.weight"]
    # 4) no second decoder (CroCo-style): copy the first one
    if not any(k.startswith("dec_blocks2.") for k in sd):
        for k in [k for k in expected if k.startswith("dec_blocks2.") and k not in sd]:
            src = "dec_blocks." + k[len("dec_blocks2."):]
            if src in sd:
                sd[k] = sd[src].clone()
                copied.append(k)
    return sd, copied


def _names(names: Iterable[str], limit: int = 3) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def compare_state_dict(model_shapes: Mapping[str, tuple], file_shapes: Mapping[str, tuple]
                       ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) names between the model's and a file's state-dict shapes."""
    missing = [k for k in model_shapes if k not in file_shapes]
    unexpected = [k for k in file_shapes if k not in model_shapes]
    wrong = [k for k in model_shapes if k in file_shapes and tuple(model_shapes[k]) != tuple(file_shapes[k])]
    return missing, unexpected, wrong


def _mismatch_message(source: str, model: nn.Module, missing, unexpected, wrong, model_shapes, file_shapes) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} with wrong shape ({k}: file {list(file_shapes[k])} vs model "
                     f"{list(model_shapes[k])}{', ...' if len(wrong) > 1 else ''})")
    cfg = getattr(model, "config", None)
    what = format_model_spec(cfg)[:160] if isinstance(cfg, Mapping) else type(model).__name__
    return (f"checkpoint {source} does not match the model {what}: " + "; ".join(parts)
            + " (wrong file or wrong model options?)")


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>",
                            *, aliases: Mapping[str, str] = (), assign: bool = False) -> list[str]:
    """Strict load after completing aliases / second decoder and checking names and shapes (one-line error).

    Returns the names copied from the first decoder (empty for a complete checkpoint). With `assign=True` the
    file's tensors become the parameters (for a model built on the meta device); dtypes follow the model.
    """
    sd, copied = _complete_state_dict(dict(state_dict), model, aliases)
    model_sd = model.state_dict()
    model_shapes = {k: tuple(v.shape) for k, v in model_sd.items()}
    file_shapes = {k: tuple(v.shape) for k, v in sd.items()}
    missing, unexpected, wrong = compare_state_dict(model_shapes, file_shapes)
    if missing or unexpected or wrong:
        raise CheckpointError(_mismatch_message(source, model, missing, unexpected, wrong, model_shapes, file_shapes))
    for k, v in model_sd.items():
        t = sd[k]
        if t.is_floating_point() != v.is_floating_point():
            raise CheckpointError(f"checkpoint {source}: tensor {k} has dtype {t.dtype}, the model expects {v.dtype}")
        if t.dtype != v.dtype:
            t = sd[k] = t.to(v.dtype)
        if assign and not t.is_contiguous():
            sd[k] = t.contiguous()
    try:
        model.load_state_dict(sd, strict=True, assign=assign)
    except Exception as exc:  # pragma: no cover - names and shapes were checked above
        raise CheckpointError(f"cannot load {source}: {_one_line(exc, 200)}") from None
    return copied


def _has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def load_model(source: str | os.PathLike, device: str | torch.device = "cpu", *, inference: bool = True,
               spec: str | None = None, config: Mapping[str, Any] | None = None) -> nn.Module:
    """Load a DUSt3R network from a `.pth` file, a `.safetensors` file, a local HF folder or a hub name.

    `inference=True` (default) does what the reference loader does for inference: `ManyAR_PatchEmbed` becomes
    the plain patch embedding and `landscape_only=False`; `inference=False` keeps the options of the file.
    `spec` (constructor string) or `config` (dict) supply or override the model options, e.g. for a bare state
    dict. The model is returned in eval mode on `device`.
    """
    raw = read_checkpoint(source, strict_spec=spec is None and config is None)
    if spec is not None:
        raw.class_name, raw.options = parse_model_spec(spec, "spec=")
    elif config is not None:
        raw.class_name, raw.options = MODEL_CLASS, _check_options(MODEL_CLASS, dict(config), "config=")
    if raw.class_name is None:
        raise CheckpointError(
            f"checkpoint {raw.source} carries no model options (bare state dict or no {_HF_CONFIG}); pass an official "
            f"checkpoint (a .pth with its 'args', or a Hugging Face folder with {_HF_CONFIG} and the weights), or load "
            "this one from Python with spec= or config= giving the constructor options")
    if raw.class_name == CROCO_CLASS:
        raise CheckpointError(
            f"{raw.source} is a CroCo pretraining checkpoint ({CROCO_CLASS}) without DUSt3R heads; use it to "
            "initialise training (load_croco_init) or pass a DUSt3R checkpoint")
    options = inference_options(raw.options) if inference else dict(raw.options)
    model = None
    try:
        model = build_model(options, meta=True, source=raw.source)
    except CheckpointError:
        model = None
    if model is not None:
        load_state_dict_checked(model, raw.state_dict, raw.source, aliases=raw.aliases, assign=True)
        if _has_meta(model):  # buffers computed in __init__ are not in the file: build for real
            model = None
    if model is None:
        model = build_model(options, source=raw.source)
        load_state_dict_checked(model, raw.state_dict, raw.source, aliases=raw.aliases)
    return model.to(device).eval()


def load_croco_init(model: nn.Module, source: str | os.PathLike) -> dict[str, list[str]]:
    """Initialise `model` from a CroCo pretraining (or any DUSt3R-like) checkpoint, loading what matches.

    The second decoder is copied from the first when the file has none. Names absent from the file (e.g. the
    heads) keep their initialisation; names the model lacks (e.g. CroCo's `prediction_head`) are ignored; a
    shape mismatch is an error. Returns {'loaded', 'copied', 'missing', 'unexpected'} lists of names.
    """
    raw = read_checkpoint(source, strict_spec=False)
    sd, copied = _complete_state_dict(raw.state_dict, model, raw.aliases)
    model_sd = model.state_dict()
    model_shapes = {k: tuple(v.shape) for k, v in model_sd.items()}
    file_shapes = {k: tuple(v.shape) for k, v in sd.items()}
    missing, unexpected, wrong = compare_state_dict(model_shapes, file_shapes)
    if wrong:
        raise CheckpointError(_mismatch_message(raw.source, model, [], [], wrong, model_shapes, file_shapes))
    loaded = [k for k in model_sd if k in sd]
    if not loaded:
        raise CheckpointError(f"checkpoint {raw.source} shares no weights with the model; wrong file?")
    with torch.no_grad():
        for k in loaded:
            model_sd[k].copy_(sd[k].to(model_sd[k].dtype))
    return {"loaded": loaded, "copied": copied, "missing": missing, "unexpected": unexpected}


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------

def _plain(value: Any, key: str) -> Any:
    """Values allowed in saved args: what a weights-only load reads back (Paths become strings)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        out = [_plain(v, key) for v in value]
        return tuple(out) if isinstance(value, tuple) else out
    if isinstance(value, dict):
        return {str(k): _plain(v, key) for k, v in value.items()}
    raise CheckpointError(f"cannot save argument {key}={value!r}: only plain values (numbers, strings, lists...)")


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}


def save_pth(model: nn.Module, path: str | os.PathLike, args: argparse.Namespace | Mapping | None = None, *,
             entries: Mapping[str, Any] | None = None, **extra: Any) -> Path:
    """Write `{'model': state_dict, 'args': Namespace(model=SPEC, ...)}` (the official format) atomically.

    `args` (Namespace or dict) and `extra` keywords become fields of the saved Namespace (plain values only);
    `model` is always the model's constructor string. `entries` adds top-level entries (e.g. epoch, optimizer
    state) that must be loadable with `weights_only=True`.
    """
    path = Path(path)
    fields: dict[str, Any] = {}
    if args is not None:
        fields.update(vars(args) if isinstance(args, argparse.Namespace) else dict(args))
    fields.update(extra)
    fields = {str(k): _plain(v, str(k)) for k, v in fields.items()}
    fields["model"] = model_spec(model)
    parse_model_spec(fields["model"])  # what we write must read back
    ckpt: dict[str, Any] = {"model": _cpu_state_dict(model), "args": argparse.Namespace(**fields)}
    for k, v in (entries or {}).items():
        if k in ("model", "args"):
            raise CheckpointError(f"save_pth: entry name '{k}' is reserved")
        ckpt[k] = v
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp), "checkpoint", error=CheckpointError)
    return path


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return value


def save_hf(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` (Hugging Face layout) atomically into `folder`.

    Tensors registered under several names are written once, under the first name in sorted order (as the
    official files: `layer{1..4}_rn` kept, `layer_rn.{0..3}` dropped); the metadata maps dropped to kept names.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    cfg = _model_config(model)
    _check_options(MODEL_CLASS, cfg, "model.config")
    sd = model.state_dict()
    metadata = {"format": "pt"}
    drop: set[str] = set()
    for group in _shared_names(model):
        keep = sorted(group)[0]
        for n in group:
            if n != keep:
                drop.add(n)
                metadata[n] = keep
    # tensors sharing storage without being the same module parameter (rare) are cloned
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in sd.items():
        if k in drop:
            continue
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or (t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    text = json.dumps({k: _json_value(v) for k, v in cfg.items()}, indent=2) + "\n"

    def write_cfg(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(folder / _HF_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "weights file",
                 error=CheckpointError)
    atomic_write(folder / _HF_CONFIG, write_cfg, "model config", error=CheckpointError)
    return folder
