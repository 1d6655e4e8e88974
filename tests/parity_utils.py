"""OpenCLIP/clipforge model pairs on the same weights, for the tower and model-family parity tests."""
from __future__ import annotations

import json

import open_clip
import torch

import clipforge
from clipforge.models import add_model_config


def register(tmp_path, name, cfg):
    """Register the model config ``cfg`` as ``name`` in both libraries (through one JSON file)."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    add_model_config(path)
    return name


def openclip_pair(tmp_path, name, cfg, seed=0):
    """An OpenCLIP model from a seeded init, and the clipforge model loaded from its state-dict file."""
    register(tmp_path, name, cfg)
    torch.manual_seed(seed)
    ref = open_clip.create_model(name, pretrained_text=False).eval()
    # Perturb every floating tensor so zero-initialised biases/norms are exercised too.
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.02)
    ckpt = tmp_path / f"{name}.pt"
    torch.save(ref.state_dict(), ckpt)
    ours = clipforge.create_model(name, pretrained=ckpt)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    return ref, ours


def perturb(module, scale=0.02, seed=1):
    """Shift every floating tensor so zero/one-initialised biases and norms are exercised too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * scale)
