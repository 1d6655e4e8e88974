"""Contrastive training and fine-tuning: typed config, one linear loop, checkpoints that resume exactly."""
from .config import (LossSettings, ModelSettings, OptimSettings, TrainConfig, ValSettings, load_config,
                     save_config)
from .loop import TrainingDiverged, build_model, train
from .optim import build_optimizer, lr_at, param_groups
from .wise_ft import interpolate_weights, wise_ft

__all__ = ["TrainConfig", "ModelSettings", "OptimSettings", "LossSettings", "ValSettings", "load_config",
           "save_config", "train", "build_model", "TrainingDiverged", "build_optimizer", "lr_at", "param_groups",
           "interpolate_weights", "wise_ft"]
