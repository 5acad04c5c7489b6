"""Training and test criteria of DUSt3R: Regr3D, ConfLoss and the test metric Regr3D_ScaleShiftInv.

A batch view (ground truth) holds `pts3d` (B,H,W,3) world points, `valid_mask` (B,H,W) bool and `camera_pose`
(B,4,4) camera-to-world (OpenCV). Predictions are the network outputs: pred1['pts3d'] (view 1 in its own frame),
pred2['pts3d_in_other_view'] (view 2 in view 1's frame), each with 'conf' (B,H,W).
"""

from __future__ import annotations

import torch


def to_frame(pts: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    """World points (B,H,W,3) -> points in the camera frame of c2w (B,4,4)."""
    w2c = torch.linalg.inv(c2w.double()).to(pts.dtype)
    return torch.einsum("bij,bhwj->bhwi", w2c[:, :3, :3], pts) + w2c[:, None, None, :3, 3]


def avg_dist(p1: torch.Tensor, p2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Per-sample average distance to the origin of the valid points of both views: (B,)."""
    d = (p1.norm(dim=-1) * v1).flatten(1).sum(1) + (p2.norm(dim=-1) * v2).flatten(1).sum(1)
    n = v1.flatten(1).sum(1) + v2.flatten(1).sum(1)
    return (d / n.clamp(min=1)).clamp(min=1e-8)


def normalize_pair(p1, p2, v1, v2):
    """Divide both point maps by their joint average distance (the 'avg_dis' normalisation)."""
    s = avg_dist(p1, p2, v1, v2)[:, None, None, None]
    return p1 / s, p2 / s


class Regr3D:
    """Per-pixel Euclidean distance between normalised predicted and ground-truth points in view 1's frame.

    `__call__(gt1, gt2, pred1, pred2)` returns ((l1 (n1,), v1 (B,H,W)), (l2 (n2,), v2)) where l* are the losses of
    the valid pixels (masks v*), and `details` with the mean per view.
    """

    def __init__(self, norm: bool = True):
        self.norm = norm

    def get_pts(self, gt1: dict, gt2: dict, pred1: dict, pred2: dict):
        c2w1 = gt1["camera_pose"]
        g1 = to_frame(gt1["pts3d"].float(), c2w1)
        g2 = to_frame(gt2["pts3d"].float(), c2w1)
        v1, v2 = gt1["valid_mask"].bool().clone(), gt2["valid_mask"].bool().clone()
        p1 = pred1["pts3d"].float()
        p2 = pred2["pts3d_in_other_view"].float()
        if self.norm:
            p1, p2 = normalize_pair(p1, p2, v1, v2)
            g1, g2 = normalize_pair(g1, g2, v1, v2)
        return g1, g2, p1, p2, v1, v2

    def distances(self, g1, g2, p1, p2):
        return (p1 - g1).norm(dim=-1), (p2 - g2).norm(dim=-1)

    def __call__(self, gt1: dict, gt2: dict, pred1: dict, pred2: dict):
        g1, g2, p1, p2, v1, v2 = self.get_pts(gt1, gt2, pred1, pred2)
        d1, d2 = self.distances(g1, g2, p1, p2)
        l1, l2 = d1[v1], d2[v2]
        details = {f"{type(self).__name__}_pts3d_1": float(l1.detach().mean()) if l1.numel() else 0.0,
                   f"{type(self).__name__}_pts3d_2": float(l2.detach().mean()) if l2.numel() else 0.0}
        return (l1, v1), (l2, v2), details

    def loss(self, gt1, gt2, pred1, pred2) -> tuple[torch.Tensor, dict]:
        """Mean over valid pixels of each view, summed over the two views (the criterion used at test time)."""
        (l1, _), (l2, _), details = self(gt1, gt2, pred1, pred2)
        total = _mean(l1) + _mean(l2)
        details[type(self).__name__] = float(total.detach())
        return total, details


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean() if x.numel() else x.new_zeros(())


def _median(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample median of x (B,N) over mask (B,N) (nan-aware); 0 where a sample has no valid entry."""
    y = torch.where(mask, x, torch.full_like(x, float("nan")))
    m = torch.nanmedian(y, dim=1).values
    return torch.nan_to_num(m, nan=0.0)


class Regr3D_ScaleShiftInv(Regr3D):
    """Regr3D after aligning shift and scale: each point map pair (pred and GT separately) gets the median depth of
    its valid points subtracted from z, then the prediction is rescaled so that its median distance to the origin
    equals the ground truth's. Invariant to a global scale and depth shift of the prediction."""

    def get_pts(self, gt1, gt2, pred1, pred2):
        g1, g2, p1, p2, v1, v2 = super().get_pts(gt1, gt2, pred1, pred2)
        vm = torch.cat([v1.flatten(1), v2.flatten(1)], 1)

        def shift_scale(a, b):
            z = torch.cat([a[..., 2].flatten(1), b[..., 2].flatten(1)], 1)
            sh = _median(z, vm)[:, None, None]
            a = torch.cat([a[..., :2], (a[..., 2] - sh)[..., None]], -1)
            b = torch.cat([b[..., :2], (b[..., 2] - sh)[..., None]], -1)
            n = torch.cat([a.norm(dim=-1).flatten(1), b.norm(dim=-1).flatten(1)], 1)
            return a, b, _median(n, vm).clamp(min=1e-8)

        g1, g2, gs = shift_scale(g1, g2)
        p1, p2, ps = shift_scale(p1, p2)
        f = (gs / ps)[:, None, None, None]
        return g1, g2, p1 * f, p2 * f, v1, v2


class ConfLoss:
    """Confidence-weighted regression: per pixel conf*loss - alpha*log(conf), averaged per view, summed."""

    def __init__(self, pixel_loss: Regr3D, alpha: float = 0.2):
        if alpha <= 0:
            raise ValueError(f"ConfLoss: alpha must be > 0, got {alpha}")
        self.pixel_loss, self.alpha = pixel_loss, alpha

    def __call__(self, gt1: dict, gt2: dict, pred1: dict, pred2: dict) -> tuple[torch.Tensor, dict]:
        (l1, v1), (l2, v2), details = self.pixel_loss(gt1, gt2, pred1, pred2)
        c1, c2 = pred1["conf"].float()[v1], pred2["conf"].float()[v2]
        t1 = _mean(c1 * l1 - self.alpha * torch.log(c1))
        t2 = _mean(c2 * l2 - self.alpha * torch.log(c2))
        total = t1 + t2
        details.update(conf_loss_1=float(t1.detach()), conf_loss_2=float(t2.detach()),
                       regr_mean=float((_mean(l1.detach()) + _mean(l2.detach())) / 2))
        return total, details


CRITERIA = {"Regr3D": Regr3D, "Regr3D_ScaleShiftInv": Regr3D_ScaleShiftInv}


def make_train_criterion(alpha: float = 0.2) -> ConfLoss:
    """The published training criterion: ConfLoss(Regr3D(norm_mode='avg_dis'), alpha=0.2)."""
    return ConfLoss(Regr3D(norm=True), alpha=alpha)
