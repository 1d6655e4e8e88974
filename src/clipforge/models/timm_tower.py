"""Image towers built by timm, laid out like OpenCLIP's ``TimmModel`` (``trunk.*`` then ``head.*``).

The trunk is always created with ``pretrained=False``: weights come from a clipforge/OpenCLIP
checkpoint, never from a download behind the user's back.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from ..config import VisionConfig

POOLS = ("avg", "", "map", "token", "max", "avgmax", "abs_attn", "rot_attn")
PROJS = ("linear", "mlp", "none", "")


def import_timm():
    try:
        import timm
    except ImportError as e:  # optional dependency
        raise ImportError("this model's image tower comes from timm: pip install 'clipforge[timm]'") from e
    return timm


class TimmTower(nn.Module):
    """A timm backbone (``trunk``) followed by an optional attention pool and projection (``head``).

    As in OpenCLIP: without an extra projection or attention pool, timm's own pooling and classifier
    do the work (its classifier becomes the projection to ``embed_dim``, or is removed for
    ``timm_proj='none'``); otherwise the classifier is dropped and ``head`` projects the features.
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        timm = import_timm()
        pool, proj = cfg.timm_pool, cfg.timm_proj
        if pool not in POOLS:
            raise ValueError(f"timm_pool must be one of {POOLS}, got {pool!r}")
        if proj not in PROJS:
            raise ValueError(f"timm_proj must be one of {PROJS}, got {proj!r}")
        self.cfg = cfg
        self.output_dim = embed_dim
        kwargs = dict(cfg.timm_model_kwargs or {})
        if cfg.timm_drop_path is not None:
            kwargs["drop_path_rate"] = cfg.timm_drop_path
        if cfg.patch_dropout > 0:
            kwargs["patch_drop_rate"] = cfg.patch_dropout
        attn_pool = pool in ("abs_attn", "rot_attn")
        extra_proj = proj in ("linear", "mlp")
        if not extra_proj and not attn_pool:
            num_classes = 0 if proj == "none" else embed_dim
            self.trunk = timm.create_model(cfg.timm_model_name, pretrained=False, num_classes=num_classes,
                                           global_pool=pool, **kwargs)
            width = embed_dim
        else:
            self.trunk = timm.create_model(cfg.timm_model_name, pretrained=False, **kwargs)
            feat_size = self.trunk.default_cfg.get("pool_size", None)
            if attn_pool:
                if not feat_size:
                    raise ValueError(f"timm_pool={pool!r} needs a 2D feature map; {cfg.timm_model_name} has none")
                self.trunk.reset_classifier(0, global_pool="")
            else:
                self.trunk.reset_classifier(0, **({"global_pool": pool} if pool else {}))
            width = self.trunk.num_features

        head = OrderedDict()
        if pool == "abs_attn":
            from timm.layers import AttentionPool2d
            head["pool"] = AttentionPool2d(width, feat_size=feat_size, out_features=embed_dim)
            width = embed_dim
        elif pool == "rot_attn":
            from timm.layers import RotAttentionPool2d
            head["pool"] = RotAttentionPool2d(width, out_features=embed_dim)
            width = embed_dim
        if proj == "linear":
            head["drop"] = nn.Dropout(cfg.timm_drop)
            head["proj"] = nn.Linear(width, embed_dim, bias=cfg.timm_proj_bias)
        elif proj == "mlp":
            from timm.layers import Mlp
            head["mlp"] = Mlp(width, 2 * embed_dim, embed_dim, drop=(cfg.timm_drop, 0.0),
                              bias=(True, cfg.timm_proj_bias))
        self.head = nn.Sequential(head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's unpooled features: [B, C, H', W'] for CNNs, [B, N, D] for ViTs."""
        return self.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the trunk except its last ``unlocked_groups`` timm layer groups; the head stays trainable."""
        from timm.layers import freeze_batch_norm_2d
        from timm.models import group_modules, group_parameters

        if not unlocked_groups:
            for p in self.trunk.parameters():
                p.requires_grad = False
            if freeze_bn_stats:
                self.trunk = freeze_batch_norm_2d(self.trunk)
            return
        matcher = self.trunk.group_matcher()
        groups = group_parameters(self.trunk, matcher)  # {group id: [param names]}
        last_locked = max(groups) - unlocked_groups
        for group_id in range(last_locked + 1):
            for name in groups.get(group_id, []):
                self.trunk.get_parameter(name).requires_grad = False
        if freeze_bn_stats:
            modules = group_modules(self.trunk, matcher, reverse=True)  # {module name: group id}
            for name, group_id in modules.items():
                if group_id <= last_locked:
                    _replace_submodule(self.trunk, name, freeze_batch_norm_2d(self.trunk.get_submodule(name)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set:
        own = dict(self.named_parameters())
        names = getattr(self.trunk, "no_weight_decay", lambda: set())()
        return {f"trunk.{n}" for n in names if f"trunk.{n}" in own}


def _replace_submodule(root: nn.Module, name: str, new: Optional[nn.Module]) -> None:
    if not name:
        return
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
