"""The README's Python snippets run as written (bundled model, CPU, the bundled example photos)."""

import re
from pathlib import Path

import numpy as np

import dust3r_ns
from dust3r_ns.pipeline import DEFAULT_WEIGHTS

REPO = Path(__file__).resolve().parents[1]


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_package_exports_the_pipeline_steps():
    for name in ("load_model", "load_images", "make_pairs", "inference", "global_align", "Reconstruction",
                 "PairPredictions"):
        assert callable(getattr(dust3r_ns, name)), name


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    snippets = _snippets()
    assert len(snippets) >= 2 and "from dust3r_ns import" in snippets[0]
    model = str(next(p for p in sorted(DEFAULT_WEIGHTS.iterdir()) if (p / "config.json").exists()))
    (tmp_path / "photos").symlink_to(REPO / "examples" / "synthetic_room")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for code in snippets:
        code = (code.replace("naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt", model).replace('"cuda"', '"cpu"')
                .replace("size=512", "size=224"))
        exec(compile(code, "README.md", "exec"), scope)
    rec, xyz = scope["rec"], scope["xyz"]
    assert len(rec) == 5 and np.isfinite(rec.c2w).all() and len(xyz) > 1000
    assert (tmp_path / "pairs.npz").is_file()
    again = dust3r_ns.PairPredictions.load(tmp_path / "pairs.npz")
    assert again.n_images == 5 and again.n_edges == 20
