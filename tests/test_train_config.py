"""The training config: YAML, options and overrides through jsonargparse, with errors that name the key."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from clipforge.precision import PRECISIONS
from clipforge.train.config import (LossSettings, ModelSettings, OptimSettings, TrainConfig, ValSettings,
                                    config_parser, load_config, parse_config, save_config)


def _yaml(tmp_path, d, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d) if isinstance(d, dict) else d)
    return path


def test_yaml_then_options_then_overrides_in_order(tmp_path):
    path = _yaml(tmp_path, {"optim": {"lr": 1e-3, "warmup_steps": 7}, "batch_size": 16,
                            "data": {"kind": "csv", "train_data": "a.tsv"}})
    cfg = parse_config(["--config", str(path), "--optim.lr", "1e-4", "--data.train_data=b.tsv", "epochs=3",
                        "model.name=null", "--aug.scale", "[0.5, 1.0]"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 7 and cfg.batch_size == 16 and cfg.epochs == 3
    assert cfg.data.train_data == "b.tsv" and cfg.data.kind == "csv" and cfg.model.name is None
    assert cfg.aug.scale == (0.5, 1.0)
    # the file read after an option overrides it; the last of two options wins
    assert parse_config(["--batch_size", "8", "--config", str(path)]).batch_size == 16
    assert parse_config(["batch_size=8", "--batch_size=4"]).batch_size == 4


def test_yaml_floats_without_a_dot_and_ints_for_floats(tmp_path):
    path = _yaml(tmp_path, "optim:\n  lr: 1e-4\n  eps: 1\n")  # YAML 1.1 reads 1e-4 as a string
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float) and isinstance(cfg.optim.eps, float)


def test_round_trip_through_dict_and_saved_yaml(tmp_path):
    cfg = TrainConfig.from_dict({"model": {"name": None, "config": {"embed_dim": 32, "vision_cfg": {"layers": 2}}},
                                 "data": {"kind": "shapes", "shapes": {"heldout_pairs": [["circle", "red"]]}},
                                 "aug": {"scale": [0.5, 1.0], "color_jitter": [0.1, 0.2, 0.3, 0.4]},
                                 "loss": {"kind": "siglip"}, "max_steps": 3})
    assert cfg.aug.scale == (0.5, 1.0) and cfg.aug.color_jitter == (0.1, 0.2, 0.3, 0.4)
    assert cfg.data.shapes.heldout_pairs == [("circle", "red")] and cfg.model.config["vision_cfg"] == {"layers": 2}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert TrainConfig.from_dict({}) == TrainConfig() == load_config()


def test_unknown_keys_name_their_dotted_path_and_the_known_keys(tmp_path):
    known_optim = r"known keys: \['beta1', 'beta2', 'cooldown_power', 'cooldown_steps', 'eps', 'grad_clip_norm', 'implementation', 'lr'"
    for args in (["--optim.lrr", "1"], ["--optim.lrr=1"], ["optim.lrr=1"],
                 ["--config", str(_yaml(tmp_path, {"optim": {"lrr": 1, "lr": 1e-3}}))]):
        with pytest.raises(ValueError, match=r"^config\.optim: unknown key\(s\) \['lrr'\]; " + known_optim):
            parse_config(args)
    with pytest.raises(ValueError, match=r"^config\.optim: unknown key\(s\) \['lrr'\]; " + known_optim):
        TrainConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ValueError, match=r"^config\.data\.shapes: unknown key\(s\) \['seedd'\]; known keys: .*'seed'"):
        load_config(_yaml(tmp_path, {"data": {"kind": "shapes", "shapes": {"seedd": 1}}}))
    with pytest.raises(ValueError, match=r"^config: unknown key\(s\) \['epoch'\]; known keys: \['accum_freq', "):
        load_config(overrides=["epoch=2"])
    with pytest.raises(ValueError, match=r"^config: unknown key\(s\) \['lr'\]"):  # a section forgotten
        parse_config(["--lr", "1e-4"])
    with pytest.raises(ValueError, match=r"^config\.epochs is a setting, not a section: no 'x' in it"):
        parse_config(["epochs.x=1"])


def test_mistyped_values_name_the_path_and_the_expected_type(tmp_path):
    cases = [
        (["--optim.lr", "fast"], r"^config\.optim\.lr: expected a number, got 'fast'"),
        (["batch_size=lots"], r"^config\.batch_size: expected an integer, got 'lots'"),
        (["--max_steps=many"], r"^config\.max_steps: expected an integer \(or null\), got 'many'"),
        (["--tensorboard", "sometimes"], r"^config\.tensorboard: expected true or false, got 'sometimes'"),
        (["--config", str(_yaml(tmp_path, {"optim": {"lr": "fast"}}))], r"^config\.optim\.lr: expected a number"),
        (["--config", str(_yaml(tmp_path, {"aug": {"scale": [1, 2, 3]}}, "scale.yaml"))],
         r"^config\.aug\.scale: expected Tuple\[float, float\], got \[1, 2, 3\]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_config(args)
    with pytest.raises(ValueError, match=r"^config\.batch_size: expected an integer, got 3\.5"):
        TrainConfig.from_dict({"batch_size": 3.5})
    with pytest.raises(ValueError, match=r"^config\.optim: expected a mapping, got int"):
        TrainConfig.from_dict({"optim": 3})
    with pytest.raises(ValueError, match=r"^config\.name: expected a string, got 5"):
        TrainConfig.from_dict({"name": 5})


def test_post_init_checks_name_their_section(tmp_path):
    with pytest.raises(ValueError, match=r"^config\.data: data kind 'csv' needs train_data"):
        parse_config(["data.kind=csv"])
    with pytest.raises(ValueError, match=r"^config\.loss: loss\.kind must be one of \('auto', 'clip', 'siglip', 'coca', 'distill'\)"):
        load_config(_yaml(tmp_path, {"loss": {"kind": "infonce"}}))
    with pytest.raises(ValueError, match=r"^config\.optim: optim\.schedule must be one of"):
        parse_config(["--optim.schedule", "linear"])
    with pytest.raises(ValueError, match=r"^config: precision must be one of \['auto', 'fp32', 'bf16', 'fp16'\], got 'fp8'"):
        parse_config(["--precision", "fp8"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(_yaml(tmp_path, "optim: [unclosed\n"))
    with pytest.raises(ValueError, match="the top level must be a mapping"):
        load_config(_yaml(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="override 'optim.lr': expected key.path=value"):
        parse_config(["optim.lr"])


def test_loss_kind_defaults_to_following_the_model():
    assert LossSettings().kind == TrainConfig().loss.kind == "auto"
    for kind in ("auto", "clip", "siglip"):
        assert load_config(overrides=[f"loss.kind={kind}"]).loss.kind == kind


def test_precision_choices_are_the_one_table():
    for name in PRECISIONS:
        assert TrainConfig(precision=name).precision == name
    assert "fp8" not in PRECISIONS
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")


def test_every_setting_has_help():
    """Each field of the settings clipforge owns is documented (the ``clipforge train --help`` text)."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    helps = {action.dest: action.help for action in config_parser()._actions}
    from clipforge.data.loader import DataConfig
    from clipforge.data.synthetic import ShapesConfig
    from clipforge.transforms import AugmentationConfig

    sections = {"model": ModelSettings, "optim": OptimSettings, "loss": LossSettings, "val": ValSettings,
                "data": DataConfig, "aug": AugmentationConfig, "data.shapes": ShapesConfig}
    for prefix, cls in [("", TrainConfig), *((f"{k}.", v) for k, v in sections.items())]:
        for f in dataclasses.fields(cls):
            if f.name in ("model", "data", "aug", "optim", "loss", "val", "shapes"):  # sections: their fields are options
                continue
            assert helps.get(prefix + f.name), f"{prefix}{f.name} has no help"


@pytest.mark.parametrize("example", sorted(p.name for p in (Path(__file__).parents[1] / "examples").glob("*.yaml")))
def test_example_configs_load(example):
    """Every examples/ config is valid (keys and types) and trains on Flickr8k with a held-out validation."""
    cfg = load_config(Path(__file__).parents[1] / "examples" / example)
    assert cfg.data.kind == "csv" and "flickr8k/train" in cfg.data.train_data and "flickr8k/dev" in cfg.val.data
