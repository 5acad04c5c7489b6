"""nerfstudio plugin: the `dust3r` dataparser (photos -> DUSt3R cameras + seed points) and `dust3r-splatfacto`.

Submodules (imported lazily; this package itself imports nothing from nerfstudio):
- `dataparser`: `Dust3rDataParserConfig`, `dust3r_dataparser` (entry point `nerfstudio.dataparser_configs`).
- `rasterizer`: a pure-PyTorch Gaussian rasterizer used only when CUDA is absent (slow test/demo path).
- `model`: `Dust3rSplatfactoModel(Config)` (splatfacto + offline/CPU fallbacks).
- `method`: `dust3r_splatfacto` (entry point `nerfstudio.method_configs`).
"""
