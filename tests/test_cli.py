"""The command line end to end on small files made by the test."""
import json
import subprocess
import sys
from typing import Optional

import pytest
import torch
import yaml

import clipforge
from clipforge.checkpoints import save_torch
from clipforge.cli import main, parse_signature, snake_options
from clipforge.train import TrainConfig

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


@pytest.mark.parametrize("top_k", ["--top-k", "--top_k"])  # the kebab spelling of README and jsonargparse's
def test_classify_prints_probabilities(tiny_model, tmp_path, photos, capsys, top_k):
    paths = []
    for i, photo in enumerate(photos[:2]):
        paths.append(str(tmp_path / f"img{i}.jpg"))
        photo.save(paths[-1])
    main(["classify", *paths, "--labels", "cat,astronaut,cup", "--model", "cli-tiny",
          "--pretrained", str(tiny_model), top_k, "3"])
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


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err


def _command(*images: str, labels: str, top_k: int = 5, quick: bool = False, name: Optional[str] = None) -> int:
    """A command.

    Args:
        images: image files
        labels: comma-separated labels
        top_k: labels shown
        quick: fast
        name: a name
    """
    return 0


def test_signature_arguments_kebab_and_bool_flags():
    args, kwargs = parse_signature(_command, snake_options(["a.jpg", "b.jpg", "--labels", "x,y", "--top-k=3", "--quick"]),
                                   "clipforge x")
    assert args == ["a.jpg", "b.jpg"] and kwargs == {"labels": "x,y", "top_k": 3, "quick": True, "name": None}
    args, kwargs = parse_signature(_command, snake_options(["a.jpg", "--no-quick", "--labels", "x", "--name", "n"]),
                                   "clipforge x")
    assert args == ["a.jpg"] and kwargs == {"labels": "x", "top_k": 5, "quick": False, "name": "n"}
    # only option names change: values, and everything after "--", stay as written
    assert snake_options(["--top-k=a-b", "a-b", "--model-name", "x-y", "--", "--c-d"]) == [
        "--top_k=a-b", "a-b", "--model_name", "x-y", "--", "--c-d"]
    _, kwargs = parse_signature(_command, ["a.jpg", "--labels", "x", "--quick", "false"], "clipforge x")
    assert kwargs["quick"] is False
    with pytest.raises(SystemExit):  # IMAGE... needs one at least
        parse_signature(_command, ["--labels", "x"], "clipforge x")
    with pytest.raises(SystemExit):
        parse_signature(_command, ["a.jpg", "--labels", "x", "--top_k", "many"], "clipforge x")


def test_signature_help_from_docstring(capsys):
    with pytest.raises(SystemExit) as e:
        parse_signature(_command, ["--help"], "clipforge x")
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "IMAGES [IMAGES ...]" in out and "image files" in out and "--top_k" in out and "labels shown" in out


def test_train_help_is_generated_from_the_settings(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "--config CONFIG" in out and "--print_config" in out
    # nested options, each with its field's documentation
    assert "--optim.lr LR" in out and "peak learning rate" in out
    assert "--loss.kind KIND" in out and "the loss follows the model" in out
    assert "--data.train_data" in out and "--batch_size BATCH_SIZE" in out and "per rank and per micro-batch" in out


def test_train_print_config_applies_yaml_options_and_overrides_in_order(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "warmup_steps": 5}, "batch_size": 16}))
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(path), "--optim.lr", "1e-4", "--data.train-data", "x.tsv", "data.kind=csv",
              "batch-size=32", "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = TrainConfig.from_dict({k: v for k, v in printed.items() if k != "config"})
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 5 and cfg.batch_size == 32
    assert cfg.data.train_data == "x.tsv" and cfg.data.kind == "csv"


def test_train_bad_setting_names_its_path(tmp_path, capsys):
    assert main(["train", "--optim.lrr", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert "clipforge train: error: config.optim: unknown key(s) ['lrr']; known keys: ['beta1', " in err
    assert main(["train", "--optim.lr", "fast"]) == 2
    assert "config.optim.lr: expected a number, got 'fast'" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_python_m_clipforge_runs_the_cli_and_help_imports_no_command():
    """``python -m clipforge`` (what torchrun runs) is the CLI; the command list imports no command module."""
    done = subprocess.run([sys.executable, "-m", "clipforge", "pretrained", "--model", "RN50"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("RN50\topenai\t"), done.stderr
    code = ("import sys; from clipforge.cli import main; assert main([]) == 1; "
            "print(sorted(m for m in sys.modules if m.startswith('clipforge.cli.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stderr
