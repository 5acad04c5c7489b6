"""DUSt3R training: losses, view processing, datasets (synthetic, CO3D) and the training loop."""

from .losses import ConfLoss, Regr3D, Regr3D_ScaleShiftInv, make_train_criterion
from .loop import TrainConfig, main, run

__all__ = ["TrainConfig", "run", "main", "Regr3D", "ConfLoss", "Regr3D_ScaleShiftInv", "make_train_criterion"]
