"""Image towers built by timm, laid out like OpenCLIP's ``TimmModel`` (``trunk.*`` then ``head.*``).

The trunk is always created with ``pretrained=False``: weights come from a clipforge/OpenCLIP
checkpoint, never from a download behind the user's back.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from ..config import VisionConfig
from .layers import feature_take_indices

POOLS = ("avg", "", "map", "token", "max", "avgmax", "abs_attn", "rot_attn")
# None (JSON null, as EVA / PE / MobileCLIP configs have it) and "" both use timm's own classifier.
PROJS = ("linear", "mlp", "none", "", None)


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

    def forward_intermediates(self, x: torch.Tensor, indices=None, stop_early: bool = False,
                              normalize_intermediates: bool = False, intermediates_only: bool = False,
                              output_fmt: str = "NCHW", output_extra_tokens: bool = False) -> dict:
        """Per-block features from timm's ``forward_intermediates``, keyed as OpenCLIP's ``TimmModel``:
        ``image_intermediates``, ``image_intermediates_prefix`` (prefix tokens, with
        ``output_extra_tokens`` on trunks that have them) and ``image_features`` (through timm's
        head and this tower's ``head``, unless ``intermediates_only``)."""
        if not hasattr(self.trunk, "forward_intermediates"):
            raise ValueError(f"timm model {self.cfg.timm_model_name} has no forward_intermediates")
        feature_info = getattr(self.trunk, "feature_info", None)
        if feature_info:  # timm asserts on bad indices; the ValueError of every other tower instead
            feature_take_indices(len(feature_info), indices)
        extra = {"return_prefix_tokens": True} if output_extra_tokens else {}
        if output_extra_tokens and "return_prefix_tokens" not in inspect.signature(
                self.trunk.forward_intermediates).parameters:
            raise ValueError(f"output_extra_tokens: timm model {self.cfg.timm_model_name} has no prefix tokens")
        trunk_out = self.trunk.forward_intermediates(x, indices=indices, intermediates_only=intermediates_only,
                                                     norm=normalize_intermediates, stop_early=stop_early,
                                                     output_fmt=output_fmt, **extra)
        intermediates = trunk_out if intermediates_only else trunk_out[1]
        output = {}
        if output_extra_tokens and intermediates and isinstance(intermediates[0], tuple):
            output["image_intermediates_prefix"] = [t[1] for t in intermediates]
            intermediates = [t[0] for t in intermediates]
        output["image_intermediates"] = intermediates
        if not intermediates_only:
            output["image_features"] = self.head(self.trunk.forward_head(trunk_out[0]))
        return output

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
