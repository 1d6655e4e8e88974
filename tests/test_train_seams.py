"""The trainer's seams: resume builds from the checkpoint, the loss follows the model, config before build."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import clipforge
from clipforge.checkpoints import save_safetensors
from clipforge.config import CLIPConfig
from clipforge.models.clip import CLIP
from clipforge.train import TrainConfig, train
from clipforge.train.checkpoint import list_checkpoints, read_training_checkpoint

from train_utils import TINY_MODEL, TINY_SIGLIP, tiny_config, write_caption_tsv


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    return write_caption_tsv(tmp_path_factory.mktemp("data"), n_images=16, captions_per_image=2)


def _weights(tmp_path, cfg=TINY_MODEL, seed=0):
    torch.manual_seed(seed)
    path = tmp_path / "start.safetensors"
    save_safetensors(CLIP(CLIPConfig.from_dict(copy.deepcopy(cfg))).state_dict(), path)
    return path


def test_resume_builds_from_the_checkpoint_not_the_yaml(tsv, tmp_path):
    start = _weights(tmp_path)
    base = tiny_config(tmp_path, tsv, model={"pretrained": str(start)}, name="ft", max_steps=2)
    train(TrainConfig.from_dict(base))
    ckpt = read_training_checkpoint(list_checkpoints(tmp_path / "runs" / "ft")[-1])
    assert ckpt["model_config"] == CLIPConfig.from_dict(copy.deepcopy(TINY_MODEL)).to_dict()
    assert ckpt["preprocess_config"]["size"] == TINY_MODEL["vision_cfg"]["image_size"]

    # The starting weights are gone: a resume must not fetch `pretrained` again.
    start.unlink()
    summary = train(TrainConfig.from_dict({**base, "max_steps": 4, "resume": "latest"}))
    assert summary["steps"] == 4 and summary["steps_this_run"] == 2


def test_resume_refuses_a_changed_model_naming_the_fields(tsv, tmp_path):
    base = tiny_config(tmp_path, tsv, name="r", max_steps=2)
    train(TrainConfig.from_dict(base))
    changed = copy.deepcopy(base)
    changed["model"]["config"]["vision_cfg"]["width"] = 32
    changed.update(max_steps=4, resume="latest")
    changed["model"]["patch_dropout"] = 0.25
    with pytest.raises(ValueError, match=r"disagrees with the checkpoint on model\.config: .*model\.patch_dropout"):
        train(TrainConfig.from_dict(changed))


def test_siglip_model_trains_with_the_sigmoid_loss_by_default(tsv, tmp_path):
    siglip = {"config": copy.deepcopy(TINY_SIGLIP)}
    summary = train(TrainConfig.from_dict(tiny_config(tmp_path, tsv, model=siglip, name="s", max_steps=2)))
    assert summary["loss_kind"] == "siglip" and summary["notes"] == []
    plain = train(TrainConfig.from_dict(tiny_config(tmp_path, tsv, name="c", max_steps=2)))
    assert plain["loss_kind"] == "clip"


def test_explicit_loss_mismatch_is_loud_or_refused(tsv, tmp_path):
    siglip = {"config": copy.deepcopy(TINY_SIGLIP)}
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, tsv, model=siglip, loss={"kind": "clip"}, name="m", max_steps=1))
    with pytest.warns(UserWarning, match="logit bias.*InfoNCE"):
        summary = train(cfg)
    assert summary["loss_kind"] == "clip" and "InfoNCE" in summary["notes"][0]
    with pytest.raises(ValueError, match="loss.kind=siglip needs a model with a logit bias"):
        train(TrainConfig.from_dict(tiny_config(tmp_path, tsv, loss={"kind": "siglip"}, name="n", max_steps=1)))


def test_matching_explicit_loss_gives_no_warning(tsv, tmp_path):
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, tsv, loss={"kind": "clip"}, name="q", max_steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train(cfg)["notes"] == []


def test_patch_dropout_is_set_on_the_config_before_the_build(tsv, tmp_path):
    start = _weights(tmp_path)
    model = clipforge.create_model(CLIPConfig.from_dict(copy.deepcopy(TINY_MODEL)),
                                   pretrained=str(start), cfg_overrides={"vision_cfg": {"patch_dropout": 0.5}})
    assert model.cfg.vision_cfg.patch_dropout == 0.5 and model.visual.patch_dropout.prob == 0.5
    with pytest.raises(ValueError, match="unknown keys in vision_cfg"):
        clipforge.create_model(CLIPConfig.from_dict(copy.deepcopy(TINY_MODEL)),
                               cfg_overrides={"vision_cfg": {"patch_dropot": 0.5}})
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, tsv, model={"pretrained": str(start), "patch_dropout": 0.5},
                                            name="pd", max_steps=1))
    train(cfg)
    final = clipforge.create_model(f"local-dir:{cfg.run_dir / 'final'}")
    assert final.cfg.vision_cfg.patch_dropout == 0.5


def test_patch_dropout_on_a_resnet_is_refused():
    from clipforge.train.config import ModelSettings
    from clipforge.train.loop import build_model

    resnet = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
              "text_cfg": TINY_MODEL["text_cfg"]}
    with pytest.raises(ValueError, match="patch_dropout needs a ViT image tower.*'resnet'"):
        build_model(ModelSettings(name=None, config=resnet, patch_dropout=0.5))


def test_plots_follow_validation_and_the_end_not_every_save(tsv, tmp_path, monkeypatch):
    import clipforge.train.loop as loop

    calls = []
    monkeypatch.setattr(loop, "plot_metrics", lambda run_dir: calls.append(run_dir))
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, tsv, name="p", max_steps=3, save_every_n_steps=1))
    train(cfg)
    assert len(list_checkpoints(cfg.run_dir)) >= 2 and len(calls) == 1
