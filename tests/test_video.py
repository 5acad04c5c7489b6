"""Video input: frames sampled at a rate or to a count, sharpest frame per window, blurry windows dropped, reused."""

import json

import av
import numpy as np
import pytest
import torch

from dust3r_ns.cli import main
from dust3r_ns.model.checkpoint import save_hf
from dust3r_ns.model.network import AsymmetricCroCo3DStereo
from dust3r_ns.video import VideoConfig, VideoError, frames_folder, sample_frames, sharpness

FPS, SECONDS, H, W = 10, 3, 64, 96


def _frame(k: int, blur: bool) -> np.ndarray:
    """A sharp checkerboard drifting sideways; `blur` averages it over a wide horizontal box (motion blur)."""
    yy, xx = np.mgrid[0:H, 0:W]
    img = ((((xx + 2 * k) // 6) + (yy // 6)) % 2 * 200 + 30).astype(np.float32)
    if blur:
        img = sum(np.roll(img, s, axis=1) for s in range(-6, 7)) / 13
    return np.repeat(img[..., None], 3, -1).astype(np.uint8)


def _write_clip(path, blurred=()) -> list[np.ndarray]:
    frames = [_frame(k, k in blurred) for k in range(FPS * SECONDS)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"qscale": "2"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return frames


def test_sharpness_ranks_blur_lower():
    assert sharpness(_frame(0, True)) < 0.5 * sharpness(_frame(0, False))


def test_rate_and_count_sampling_skip_blurred_frames(tmp_path):
    clip = tmp_path / "clip.mp4"
    blurred = set(range(0, FPS * SECONDS, 2))          # every other frame is motion-blurred
    _write_clip(clip, blurred)
    kept = sample_frames(clip, VideoConfig(fps=2))
    assert len(kept) == 2 * SECONDS
    times = [t for t, _ in kept]
    assert times == sorted(times)
    # from each half-second window the sharp frame wins over its blurred neighbours
    assert all(round(t * FPS) % 2 == 1 for t in times)
    assert len(sample_frames(clip, VideoConfig(num_frames=5))) == 5


def test_blurred_window_is_dropped(tmp_path):
    clip = tmp_path / "clip.mp4"
    _write_clip(clip, blurred=set(range(10, 20)))      # the whole second second is blurred
    kept = sample_frames(clip, VideoConfig(fps=1, min_sharpness=0.6))
    assert [round(t) for t, _ in kept] in ([0, 2], [0, 3])
    assert len(sample_frames(clip, VideoConfig(fps=1, min_sharpness=0.0))) == 3


def test_frames_folder_is_reused_and_keyed_by_options(tmp_path):
    clip = tmp_path / "clip.mp4"
    _write_clip(clip)
    a = frames_folder(clip, VideoConfig(fps=2))
    names = sorted(p.name for p in a.glob("*.png"))
    assert names == [f"frame_{k:05d}.png" for k in range(6)]
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["frames"] == names and len(manifest["times"]) == 6
    stamp = (a / "manifest.json").stat().st_mtime_ns
    assert frames_folder(clip, VideoConfig(fps=2)) == a and (a / "manifest.json").stat().st_mtime_ns == stamp
    b = frames_folder(clip, VideoConfig(fps=1))
    assert b != a and len(list(b.glob("*.png"))) == 3
    (a / names[2]).unlink()                            # damaged: rebuilt, not reused
    assert frames_folder(clip, VideoConfig(fps=2)) == a and (a / names[2]).is_file()


def test_bad_video_and_options_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    with pytest.raises(VideoError, match=r"bad\.mp4: not a readable video"):
        sample_frames(bad)
    with pytest.raises(VideoError, match="fps"):
        VideoConfig(fps=0)
    with pytest.raises(VideoError, match="no such video"):
        frames_folder(tmp_path / "missing.mp4")


def test_reconstruct_a_clip(tmp_path, monkeypatch):
    """A clip's frames are reconstructed and exported as ordered input (its pairs say so, for the aligner)."""
    import dust3r_ns.reconstruct as rc
    from dust3r_ns.predictions import PairPredictions

    torch.manual_seed(0)
    model = AsymmetricCroCo3DStereo(img_size=(224, 224), enc_embed_dim=32, enc_depth=1, enc_num_heads=2,
                                    dec_embed_dim=32, dec_depth=1, dec_num_heads=2)
    model_dir = save_hf(model, tmp_path / "tiny")
    clip = tmp_path / "clip.mp4"
    _write_clip(clip)
    out = tmp_path / "out"
    ordered = []
    real = rc.build_reconstruction
    monkeypatch.setattr(rc, "build_reconstruction", lambda paths, network, pairs, *a, **k: ordered.append(
        pairs.ordered) or real(paths, network, pairs, *a, **k))
    assert main(["reconstruct", str(clip), "--fps", "1", "--model", str(model_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"frame_{k:05d}.png" for k in range(3)]
    assert ordered == [True]
    assert main(["infer", str(clip), "--fps", "1", "--model", str(model_dir), "--out", str(tmp_path / "p.npz")]) == 0
    assert PairPredictions.load(tmp_path / "p.npz").ordered


def test_dataparser_takes_a_clip(tmp_path, monkeypatch):
    """`ns-train dust3r-splatfacto --data clip.mp4`: the dataparser reconstructs the clip's sampled frames (the
    network replaced by a fake that checks what it is given) and nerfstudio loads those frames."""
    pytest.importorskip("nerfstudio")
    import dust3r_ns.nerfstudio.dataparser as dp
    from dust3r_ns.nerfstudio.dataparser import Dust3rDataParserConfig
    from dust3r_ns.pipeline import NetworkConfig, PointsConfig
    from dust3r_ns.video import VideoConfig
    from test_nerfstudio import fake_reconstruction

    clip = tmp_path / "clip.mp4"
    _write_clip(clip)
    seen = []

    def fake_build(paths, network, pairs, *a, **k):
        assert pairs.ordered                               # a clip's frames are ordered input
        seen.append([p.name for p in paths])
        return fake_reconstruction([p.name for p in paths], sizes=[(W, H)] * len(paths))

    monkeypatch.setattr(dp, "build_reconstruction", fake_build)
    cfg = Dust3rDataParserConfig(data=clip, network=NetworkConfig(model="test/fake"), video=VideoConfig(fps=1),
                                 points=PointsConfig(conf_thr=1.0), eval_mode="all")
    out = cfg.setup().get_dataparser_outputs("train")
    assert seen == [[f"frame_{k:05d}.png" for k in range(3)]]
    assert [f.name for f in out.image_filenames] == seen[0] and all(f.is_file() for f in out.image_filenames)
    cfg.setup().get_dataparser_outputs("train")
    assert len(seen) == 1                                  # frames and reconstruction reused
