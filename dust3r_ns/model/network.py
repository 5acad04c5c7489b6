"""The DUSt3R network (``AsymmetricCroCo3DStereo``): shared ViT encoder, two cross-attending decoders, two heads.

The constructor takes exactly the keywords of the published constructor strings, and the state-dict names are
those of the published checkpoints. ``forward(view1, view2)`` returns the reference output dictionaries; the
pieces (``encode``, ``decode``, ``head_forward``) are public so the pair-inference engine can encode every
image once and batch decoders over pairs.
"""

from __future__ import annotations

import copy
import math
import re

import torch
from torch import nn

from .blocks import DecoderBlock, EncoderBlock, LayerNorm, PatchEmbed
from .heads import DPTHead, LinearHead
from .rope_ext import make_rope2d

INF = math.inf
PATCH_EMBEDS = ("PatchEmbedDust3R", "ManyAR_PatchEmbed")


def _to_tuple(v):
    return tuple(_to_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def is_symmetrized(view1: dict, view2: dict) -> bool:
    """True when the batch lists each pair in both orders (instances of 2k and 2k+1 swapped), as the reference checks."""
    x, y = view1.get("instance"), view2.get("instance")
    if x is None or y is None or len(x) != len(y) or len(x) < 2 or len(x) % 2:
        return False
    return all(x[i] == y[i + 1] and x[i + 1] == y[i] for i in range(0, len(x), 2))


def interleave(a: torch.Tensor, b: torch.Tensor):
    """([a0, a1..], [b0, b1..]) -> ([a0, b0, a1, b1..], [b0, a0, b1, a1..])."""
    return torch.stack((a, b), 1).flatten(0, 1), torch.stack((b, a), 1).flatten(0, 1)


class AsymmetricCroCo3DStereo(nn.Module):
    """DUSt3R: two views in, per-pixel 3-D points (both in view 1's frame) and confidences out."""

    def __init__(
        self,
        output_mode: str = "pts3d",
        head_type: str = "linear",
        depth_mode=("exp", -INF, INF),
        conf_mode=("exp", 1, INF),
        freeze: str = "none",
        landscape_only: bool = True,
        patch_embed_cls: str = "PatchEmbedDust3R",
        img_size=224,
        pos_embed: str = "RoPE100",
        enc_embed_dim: int = 1024,
        enc_depth: int = 24,
        enc_num_heads: int = 16,
        dec_embed_dim: int = 768,
        dec_depth: int = 12,
        dec_num_heads: int = 12,
        mlp_ratio: float = 4.0,
        norm_im2_in_dec: bool = True,
        patch_size: int = 16,
        mask_ratio: float = 0.9,
        rope_backend: str = "auto",
    ):
        # mask_ratio is a CroCo pretraining option kept so that constructor strings naming it still parse.
        super().__init__()
        depth_mode, conf_mode, img_size = _to_tuple(depth_mode), _to_tuple(conf_mode), _to_tuple(img_size)
        if output_mode != "pts3d":
            raise ValueError(f"output_mode {output_mode!r} is not supported (only 'pts3d')")
        if head_type not in ("linear", "dpt"):
            raise ValueError(f"head_type {head_type!r} is not supported (use 'linear' or 'dpt')")
        if patch_embed_cls not in PATCH_EMBEDS:
            raise ValueError(f"patch_embed_cls {patch_embed_cls!r} is not supported (use one of {PATCH_EMBEDS})")
        m = re.fullmatch(r"RoPE(\d+(?:\.\d+)?)", str(pos_embed))
        if m is None:
            raise ValueError(f"pos_embed {pos_embed!r} is not supported (DUSt3R uses 'RoPE100')")
        if freeze not in ("none", "mask", "encoder"):
            raise ValueError(f"freeze {freeze!r} is not supported (use 'none', 'mask' or 'encoder')")
        self.config = dict(
            output_mode=output_mode, head_type=head_type, depth_mode=depth_mode, conf_mode=conf_mode,
            freeze=freeze, landscape_only=bool(landscape_only), patch_embed_cls=patch_embed_cls, img_size=img_size,
            pos_embed=pos_embed, enc_embed_dim=enc_embed_dim, enc_depth=enc_depth, enc_num_heads=enc_num_heads,
            dec_embed_dim=dec_embed_dim, dec_depth=dec_depth, dec_num_heads=dec_num_heads, mlp_ratio=mlp_ratio,
            norm_im2_in_dec=norm_im2_in_dec, patch_size=patch_size,
        )
        self.landscape_only = bool(landscape_only)
        self.patch_size = patch_size
        freq = float(m.group(1))
        rope = make_rope2d(freq, backend=rope_backend)

        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_embed_dim))
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, enc_embed_dim,
                                      many_ar=patch_embed_cls == "ManyAR_PatchEmbed")
        self.enc_blocks = nn.ModuleList(
            [EncoderBlock(enc_embed_dim, enc_num_heads, mlp_ratio, rope) for _ in range(enc_depth)])
        self.enc_norm = LayerNorm(enc_embed_dim)
        self.decoder_embed = nn.Linear(enc_embed_dim, dec_embed_dim, bias=True)
        self.dec_blocks = nn.ModuleList(
            [DecoderBlock(dec_embed_dim, dec_num_heads, mlp_ratio, rope, norm_im2_in_dec) for _ in range(dec_depth)])
        self.dec_norm = LayerNorm(dec_embed_dim)
        self.dec_blocks2 = copy.deepcopy(self.dec_blocks, memo={id(rope): rope})  # RoPE (no weights) stays shared
        if head_type == "linear":
            make = lambda: LinearHead(dec_embed_dim, patch_size, depth_mode, conf_mode)  # noqa: E731
        else:
            make = lambda: DPTHead(enc_embed_dim, dec_embed_dim, dec_depth, patch_size,  # noqa: E731
                                   depth_mode, conf_mode)
        self.downstream_head1 = make()
        self.downstream_head2 = make()
        self._init_weights()
        self._apply_freeze(freeze)

    # ------------------------------------------------------------------ setup
    def _init_weights(self):
        nn.init.normal_(self.mask_token, std=0.02)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def _apply_freeze(self, freeze: str):
        frozen = {"none": [], "mask": [self.mask_token], "encoder": [self.mask_token]}[freeze]
        if freeze == "encoder":
            frozen += list(self.patch_embed.parameters()) + list(self.enc_blocks.parameters())
        for p in frozen:
            p.requires_grad_(False)

    def set_attention_impl(self, impl: str):
        """'sdpa' (fused scaled-dot-product attention, default) or 'math' (explicit softmax reference)."""
        if impl not in ("sdpa", "math"):
            raise ValueError(f"unknown attention implementation {impl!r}")
        for mod in self.modules():
            if hasattr(mod, "impl"):
                mod.impl = impl

    # ------------------------------------------------------------------ pieces
    def encode(self, img: torch.Tensor, true_shape: torch.Tensor | None = None):
        """Images (B, 3, H, W) in [-1, 1] -> encoder tokens (B, N, enc_dim) and positions (B, N, 2)."""
        if true_shape is None:
            true_shape = torch.tensor(img.shape[-2:], device=img.device).expand(img.shape[0], 2)
        x, pos = self.patch_embed(img, true_shape)
        for blk in self.enc_blocks:
            x = blk(x, pos)
        return self.enc_norm(x), pos

    def decode(self, f1, pos1, f2, pos2):
        """Both decoders in lock-step. Returns two lists: [encoder tokens, block 1 out, ..., normed last block]."""
        out1, out2 = [f1], [f2]
        x1, x2 = self.decoder_embed(f1), self.decoder_embed(f2)
        for blk1, blk2 in zip(self.dec_blocks, self.dec_blocks2):
            x1, x2 = blk1(x1, x2, pos1, pos2), blk2(x2, x1, pos2, pos1)
            out1.append(x1)
            out2.append(x2)
        out1[-1], out2[-1] = self.dec_norm(out1[-1]), self.dec_norm(out2[-1])
        return out1, out2

    def head_forward(self, which: int, tokens: list, true_shape: torch.Tensor) -> dict:
        """Run head 1 or 2 on decoder outputs; portrait images are handled as the reference does."""
        head = self.downstream_head1 if which == 1 else self.downstream_head2
        tokens = [t.float() for t in tokens]
        if not self.landscape_only:
            H, W = (int(v) for v in true_shape[0])
            return head(tokens, (H, W))
        H, W = int(true_shape.min()), int(true_shape.max())
        portrait = true_shape[:, 0] > true_shape[:, 1]
        if not portrait.any():
            return head(tokens, (H, W))
        swap = lambda d: {k: v.transpose(1, 2) for k, v in d.items()}  # noqa: E731
        if portrait.all():
            return swap(head(tokens, (W, H)))
        land = head([t[~portrait] for t in tokens], (H, W))
        port = swap(head([t[portrait] for t in tokens], (W, H)))
        res = {}
        for k, v in land.items():
            full = v.new_empty((len(true_shape),) + tuple(v.shape[1:]))
            full[~portrait], full[portrait] = v, port[k]
            res[k] = full
        return res

    # ------------------------------------------------------------------ full pair forward
    @staticmethod
    def _true_shape(view):
        ts = view.get("true_shape")
        img = view["img"]
        if ts is None:
            return torch.tensor(img.shape[-2:], device=img.device).expand(img.shape[0], 2)
        return torch.as_tensor(ts, device=img.device).reshape(-1, 2)

    def _encode_pair(self, img1, img2, s1, s2):
        if img1.shape[-2:] == img2.shape[-2:]:
            f, pos = self.encode(torch.cat((img1, img2)), torch.cat((s1, s2)))
            return f.chunk(2) + pos.chunk(2)
        (f1, p1), (f2, p2) = self.encode(img1, s1), self.encode(img2, s2)
        return f1, f2, p1, p2

    def forward(self, view1: dict, view2: dict):
        img1, img2 = view1["img"], view2["img"]
        s1, s2 = self._true_shape(view1), self._true_shape(view2)
        if is_symmetrized(view1, view2):
            # As the reference: element 2k+1 is element 2k with the views swapped, so encode the even ones only.
            f1, f2, p1, p2 = self._encode_pair(img1[::2], img2[::2], s1[::2], s2[::2])
            f1, f2 = interleave(f1, f2)
            p1, p2 = interleave(p1, p2)
        else:
            f1, f2, p1, p2 = self._encode_pair(img1, img2, s1, s2)
        dec1, dec2 = self.decode(f1, p1, f2, p2)
        with torch.autocast(device_type=img1.device.type, enabled=False):
            res1 = self.head_forward(1, dec1, s1)
            res2 = self.head_forward(2, dec2, s2)
        res2["pts3d_in_other_view"] = res2.pop("pts3d")
        return res1, res2


DUSt3R = AsymmetricCroCo3DStereo
