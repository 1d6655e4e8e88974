"""OpenAI's ModifiedResNet image tower (RN50, RN101, RN50x4, ...).

Differences from torchvision's ResNet: a 3-conv stem with average pooling, anti-aliased strided
convolutions (an average pool before each stride-2 step) and attention pooling instead of global
average pooling.

``forward_intermediates`` returns the stem's and each stage's feature maps, with OpenCLIP's
signature and output keys.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..config import VisionConfig, as_tuple2
from .layers import attention, feature_take_indices, lock_groups


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out_planes:
            # Key names "-1", "0", "1" are those of OpenAI's checkpoints.
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out_planes, 1, bias=False)),
                ("1", nn.BatchNorm2d(out_planes)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    """Single-query attention pooling: the mean token attends over all spatial tokens."""

    def __init__(self, grid: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dim = x.shape[:2]
        x = x.to(self.positional_embedding.dtype)  # a no-op unless the pool is kept fp32 behind a bf16 trunk
        x = x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1+HW, C]
        x = x + self.positional_embedding.to(x.dtype)
        heads, head_dim = self.num_heads, dim // self.num_heads
        # Only the mean token's output is used, so only its query is computed.
        q = self.q_proj(x[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)  # [B, H, 1, Dh]
        k = self.k_proj(x).view(batch, -1, heads, head_dim).transpose(1, 2)  # [B, H, 1+HW, Dh]
        v = self.v_proj(x).view(batch, -1, heads, head_dim).transpose(1, 2)
        out = attention(q, k, v)  # [B, H, 1, Dh]
        return self.c_proj(out.reshape(batch, dim))


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        self.image_size = as_tuple2(cfg.image_size)
        self.output_dim = output_dim
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        inplanes = width
        stages = []
        for i, blocks in enumerate(cfg.layers):
            planes = width * 2 ** i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        embed_dim = width * 32
        heads = embed_dim // cfg.head_width
        self.attnpool = AttentionPool2d(self.image_size[0] // 32, embed_dim, heads, output_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features ** -0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)  # each residual branch starts as identity

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.to(self.conv1.weight.dtype))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              stop_early: bool = False, normalize_intermediates: bool = False,
                              intermediates_only: bool = False, output_fmt: str = "NCHW",
                              output_extra_tokens: bool = False) -> Dict[str, Union[torch.Tensor, List[torch.Tensor]]]:
        """Feature maps of the stem and the four stages (indices 0-4), as OpenCLIP's.

        ``image_intermediates``: [B, C, H, W] maps in stage order; ``image_features``: the attention
        pool's embedding (unless ``intermediates_only``), always from the whole network: OpenCLIP
        computes it so wherever it returns one. ``normalize_intermediates`` and
        ``output_extra_tokens`` do not apply (there is no final norm and no extra token); only
        ``output_fmt="NCHW"`` exists. ``stop_early``: with ``intermediates_only`` the stages after
        the last selected one are skipped anyway.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"Output format must be == NCHW, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(5, indices)
        blocks = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]
        if intermediates_only:
            blocks = blocks[:max_index + 1]
        x = x.to(self.conv1.weight.dtype)
        intermediates = []
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take_indices:
                intermediates.append(x)
        output: Dict[str, Union[torch.Tensor, List[torch.Tensor]]] = {"image_intermediates": intermediates}
        if not intermediates_only:
            output["image_features"] = self.attnpool(x)
        return output

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Accepted for a uniform tower surface; ResNet stages are not checkpointed."""

    def no_weight_decay(self) -> set:
        return set()

    def param_groups_for_lock(self) -> List[list]:
        stem = [p for n, p in self.named_parameters() if not n.startswith(("layer", "attnpool"))]
        return [stem, *[list(s.parameters()) for s in (self.layer1, self.layer2, self.layer3, self.layer4)],
                list(self.attnpool.parameters())]

    def lock(self, unlocked_groups: int = 0) -> None:
        lock_groups(self, self.param_groups_for_lock(), unlocked_groups)
