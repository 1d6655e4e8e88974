"""The command line end to end on small files made by the test."""
import json

import pytest
import torch

import clipforge
from clipforge.checkpoints import save_torch
from clipforge.cli import main

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture()
def tiny_model(tmp_path):
    (tmp_path / "cli-tiny.json").write_text(json.dumps(TINY))
    clipforge.add_model_config(tmp_path / "cli-tiny.json")
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_torch(clipforge.create_model("cli-tiny").state_dict(), path)
    return path


def test_help_lists_commands(capsys):
    assert main([]) == 1
    out = capsys.readouterr().out
    for command in ("demo", "convert", "classify", "eval", "train", "shards"):
        assert command in out


def test_classify_prints_probabilities(tiny_model, tmp_path, photos, capsys):
    paths = []
    for i, photo in enumerate(photos[:2]):
        paths.append(str(tmp_path / f"img{i}.jpg"))
        photo.save(paths[-1])
    main(["classify", *paths, "--labels", "cat,astronaut,cup", "--model", "cli-tiny",
          "--pretrained", str(tiny_model), "--top-k", "3"])
    out = capsys.readouterr().out
    assert paths[0] in out and paths[1] in out
    probs = [float(line.split("%")[0]) for line in out.splitlines() if "%" in line]
    assert len(probs) == 6 and abs(sum(probs[:3]) - 100.0) < 0.1


def test_classify_without_labels_is_an_error(tiny_model, tmp_path):
    with pytest.raises(SystemExit):
        main(["classify", "x.jpg", "--model", "cli-tiny"])


def test_eval_zero_shot_on_image_folder(tiny_model, tmp_path, photos, capsys):
    for cls, photo in (("cat", photos[1]), ("coffee_cup", photos[2])):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        for i in range(3):
            photo.rotate(10 * i).save(tmp_path / "ds" / cls / f"{i}.jpg")
    out_json = tmp_path / "result.json"
    main(["eval", "--model", "cli-tiny", "--pretrained", str(tiny_model), "--dataset", str(tmp_path / "ds"),
          "--task", "zeroshot_classification", "--output", str(out_json), "--batch-size", "4"])
    result = json.loads(out_json.read_text())
    assert result["task"] == "zeroshot_classification"
    assert 0.0 <= result["metrics"]["acc1"] <= 1.0
    assert "acc1" in capsys.readouterr().out
