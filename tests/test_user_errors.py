"""What a user meets on bad input: one clear message and the right exit code, never a silent guess.

Issue 13's items 2-4 and 8-12, each on small files made here: the activation of a bare state dict
(refused, never guessed), the linear probe's test split, random weights, the CLI's error handling,
the smaller messages, caption-column detection and clip_benchmark's accuracy under NumPy 2.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.checkpoints import CheckpointError
from clipforge.checkpoints.formats import load_any
from clipforge.cli import main

# open_clip-compatible and tiny; shapes are ViT-B-32's layout (OpenAI key names, text tower at the root).
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
NAME = "cf-ue-tiny"
CAPTIONS = ["a red square", "a photo of a cat", "two dogs"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """NAME known to clipforge and open_clip (GELU), and NAME-quickgelu through the registries' aliases."""
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("cfg")
    (root / f"{NAME}.json").write_text(json.dumps(TINY))
    clipforge.add_model_config(root / f"{NAME}.json")
    open_clip.add_model_config(root / f"{NAME}.json")
    return open_clip


@pytest.fixture(scope="module")
def gelu_file(registered, tmp_path_factory):
    """The issue's case: a plain OpenCLIP (GELU) state dict, as `torch.save(model.state_dict())` writes it."""
    open_clip = registered
    torch.manual_seed(3)
    ref = open_clip.create_model(NAME).eval()
    path = tmp_path_factory.mktemp("gelu") / "model.pt"
    torch.save(ref.state_dict(), path)
    return ref, path


@pytest.fixture(scope="module")
def inputs():
    import open_clip

    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), open_clip.tokenize(CAPTIONS)


def _features(model, images, tokens):
    with torch.inference_mode():
        return model.encode_image(images), model.encode_text(tokens)


def _save_images(folder, n_per_colour=2, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rgb in COLOURS.items():
        for i in range(n_per_colour):
            paths.append(folder / f"{name}{i}.png")
            Image.new("RGB", (size + i, size), rgb).save(paths[-1])
    return paths


# ---- item 2: no silent QuickGELU guess ---------------------------------------------------------


def test_bare_gelu_state_dict_without_a_name_is_refused(gelu_file, tmp_path, capsys):
    _, path = gelu_file
    with pytest.raises(CheckpointError, match=rf"GELU or QuickGELU.*{NAME}'.*{NAME}-quickgelu'"):
        load_any(path)
    with pytest.raises(CheckpointError, match="GELU or QuickGELU"):
        clipforge.create_model(None, pretrained=path)
    assert main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    assert "model.pt" in err and f"{NAME}-quickgelu" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


def test_with_its_name_the_features_are_open_clips_and_hf_says_gelu(gelu_file, inputs, tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf_clip import hf_features

    ref, path = gelu_file
    images, tokens = inputs
    expected = _features(ref, images, tokens)
    model, _ = load_any(path, model_name=NAME)
    assert not model.cfg.quick_gelu
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(_features(model, images, tokens), expected))
    assert main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf", "--model-name", NAME]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["text_config"]["hidden_act"] == config["vision_config"]["hidden_act"] == "gelu"
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(hf_features(hf, images, tokens), expected))


def test_the_activation_comes_from_what_the_file_says(gelu_file, tmp_path, monkeypatch):
    """OpenAI's metadata scalars mean OpenAI's QuickGELU; a published digest means its tag's activation."""
    import hashlib

    from clipforge.pretrained import tags

    ref, path = gelu_file
    sd = dict(ref.state_dict(), input_resolution=torch.tensor(32), context_length=torch.tensor(77),
              vocab_size=torch.tensor(49408))
    torch.save(sd, tmp_path / "from_openai.pt")
    assert load_any(tmp_path / "from_openai.pt")[0].cfg.quick_gelu
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for quick in (False, True):
        tag = tags.PretrainedTag(NAME, "release", url=tags.UrlFile("https://example.invalid/m.pt", digest[:8]),
                                 quick_gelu=quick)
        monkeypatch.setattr(tags, "_TAGS", [*tags._TAGS, tag])
        assert load_any(path)[0].cfg.quick_gelu is quick


# ---- item 3: the linear probe never tests on its training images -------------------------------


@pytest.fixture(scope="module")
def tiny_model(registered):
    torch.manual_seed(0)
    return clipforge.create_model_and_transforms(NAME)[0].eval(), clipforge.get_tokenizer(NAME)


def test_linear_probe_without_a_train_split_holds_out_a_test_split(tiny_model, tmp_path):
    from clipforge.evaluate.runner import run_eval
    from clipforge.transforms import image_transform

    model, tok = tiny_model
    for name, rgb in COLOURS.items():  # flat/<colour>/<i>.png: an image folder without splits
        (tmp_path / "flat" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (40 + i, 40), rgb).save(tmp_path / "flat" / name / f"{i}.png")
    with pytest.warns(UserWarning, match="no separate train split"):
        result = run_eval("linear_probe", model, tok, image_transform(model.preprocess_cfg, is_train=False),
                          tmp_path / "flat", batch_size=8, use_tqdm=False, output=tmp_path / "r.json")
    m = result["metrics"]
    assert m["lp_test_split"] == "held_out" and m["lp_test_fraction"] == 0.2
    assert (m["lp_n_train"], m["lp_n_test"]) == (12, 3)  # one of five per class held out
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["lp_test_split"] == "held_out"
    # test/ without train/ is an error, not the test images read as both splits
    (tmp_path / "only_test").mkdir()
    (tmp_path / "flat").rename(tmp_path / "only_test" / "test")
    with pytest.raises(ValueError, match="no train/ folder"):
        run_eval("linear_probe", model, tok, image_transform(model.preprocess_cfg, is_train=False),
                 tmp_path / "only_test", use_tqdm=False)


def test_held_out_split_is_stratified_disjoint_and_seeded():
    from clipforge.evaluate.linear_probe import held_out_split

    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, test = held_out_split(y, 0.2, seed=1)
    assert sorted(fit.tolist() + test.tolist()) == list(range(len(y)))
    assert torch.bincount(y[test], minlength=3).tolist() == [2, 1, 0]
    assert torch.equal(held_out_split(y, 0.2, seed=1)[1], test)
    assert not torch.equal(held_out_split(y, 0.2, seed=2)[1], test)


# ---- item 4: random weights are announced ------------------------------------------------------


def test_classify_without_weights_warns_and_the_model_says_so(registered, gelu_file, tmp_path, capsys):
    from clipforge.evaluate.clip_benchmark_loader import load_clipforge

    paths = _save_images(tmp_path / "img", n_per_colour=1)
    assert main(["classify", str(paths[0]), "--labels", "red,blue", "--model", NAME]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "random weights" in captured.err and str(paths[0]) in captured.out
    with pytest.warns(UserWarning, match="random weights"):
        assert load_clipforge(NAME, None)[0].random_weights
    assert load_clipforge(NAME, str(gelu_file[1]))[0].random_weights is False


# ---- item 8: the CLI's error handling -----------------------------------------------------------


def test_user_errors_are_one_line_with_exit_codes_and_debug_shows_the_traceback(registered, tmp_path, capsys,
                                                                              monkeypatch):
    image = _save_images(tmp_path / "img", n_per_colour=1)[0]
    args = ["classify", str(image), "--labels", "a,b", "--model", NAME, "--pretrained", str(tmp_path / "nope.pt")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("clipforge classify: error: ") and "nope.pt" in err and len(err.strip().splitlines()) == 1
    assert main(["classify", str(image), "--labels", "a,b", "--model", NAME, "--top-k", "-1"]) == 2  # usage
    assert "--top-k must be at least 1" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        main(["--debug", *args])
    monkeypatch.setenv("CLIPFORGE_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        main(args)


def test_closed_stdout_ends_quietly():
    """`clipforge models | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "clipforge", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child writes anything (it is still importing)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_unknown_model_name_is_an_error_with_suggestions():
    done = subprocess.run([sys.executable, "-m", "clipforge", "pretrained", "--model", "ViT-B-33"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert "unknown model 'ViT-B-33'" in done.stderr and "ViT-B-32" in done.stderr
    assert "Traceback" not in done.stderr


# ---- item 9: the smaller ones ------------------------------------------------------------------


def test_one_bad_image_among_several_still_classifies_the_others(registered, gelu_file, tmp_path, capsys):
    good = [str(p) for p in _save_images(tmp_path / "img", n_per_colour=1)[:2]]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main(["classify", good[0], str(bad), good[1], "--labels", "red,green,blue", "--model", NAME,
                 "--pretrained", str(gelu_file[1]), "--top-k", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert good[0] in out and good[1] in out and str(bad) not in out and out.count("%") == 4
    assert "broken.jpg" in err and "Traceback" not in err


def test_an_image_given_to_convert_is_not_called_a_security_risk(tmp_path, capsys):
    photo = _save_images(tmp_path / "img", n_per_colour=1)[0]
    Image.open(photo).save(tmp_path / "photo.jpg")
    assert main(["convert", str(tmp_path / "photo.jpg"), str(tmp_path / "out"), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    assert "photo.jpg: not a checkpoint: a JPEG image" in err and "arbitrary code" not in err


def test_train_without_config_or_data_is_an_error(capsys):
    from clipforge.cli.train import parse

    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "no --config and no data given" in err and "synthetic" in err and "--config run.yaml" in err
    assert parse(["data.kind=synthetic"], "clipforge train", "")["config"].data.kind == "synthetic"  # on purpose


def test_caption_files_that_give_no_batch_name_the_file(tmp_path):
    from clipforge.data.loader import DataConfig, build_train_loader
    from clipforge.data.robust import DataError

    header_only = tmp_path / "empty.csv"
    header_only.write_text("filepath,title\n")
    with pytest.raises(DataError, match=r"empty\.csv: no rows after the header"):
        build_train_loader(DataConfig(kind="csv", train_data=str(header_only)), lambda x: x, lambda x: x, 4)
    few = tmp_path / "few.csv"
    few.write_text("filepath,title\na.png,a\nb.png,b\n")
    with pytest.raises(ValueError, match=r"few\.csv: 2 samples .* no full batch of 4"):
        build_train_loader(DataConfig(kind="csv", train_data=str(few)), lambda x: x, lambda x: x, 4, workers=0)


def test_missing_webdataset_extra_names_the_install_command(monkeypatch):
    from clipforge.data.webdataset import expand_urls

    monkeypatch.setitem(sys.modules, "braceexpand", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'clipforge\[wds\]'"):
        expand_urls("shards/{0..3}.tar")


# ---- item 10: the caption column is found, or named in the error --------------------------------


def test_shards_finds_the_one_caption_column(tmp_path, capsys):
    import tarfile

    paths = _save_images(tmp_path / "img", n_per_colour=1)
    rows = "".join(f"img/{p.name}\ta {p.stem[:-1]} square\n" for p in paths)
    (tmp_path / "captions.tsv").write_text("filepath\tcaption\n" + rows)
    assert main(["shards", str(tmp_path / "captions.tsv"), str(tmp_path / "out")]) == 0
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        texts = sorted(tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt"))
    assert texts == ["a blue square", "a green square", "a red square"]
    (tmp_path / "two.tsv").write_text("filepath\tcaption\tnote\n" + rows.replace("\n", "\tx\n"))
    assert main(["shards", str(tmp_path / "two.tsv"), str(tmp_path / "out2")]) == 1
    assert "--caption-key" in capsys.readouterr().err


# ---- item 12: clip_benchmark's accuracy under NumPy 2 -------------------------------------------


def test_clip_benchmark_accuracy_is_shimmed_to_sklearns_numbers():
    pytest.importorskip("clip_benchmark")
    metrics = pytest.importorskip("sklearn.metrics")
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    from clipforge.evaluate.clip_benchmark_loader import register_with_clip_benchmark

    register_with_clip_benchmark()
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 7, generator=gen), torch.randint(0, 7, (50,), generator=gen)
    ref = [metrics.top_k_accuracy_score(target.numpy(), logits.numpy(), k=k, labels=np.arange(7)) for k in (1, 5)]
    assert zeroshot_classification.accuracy(logits, target, topk=(1, 5)) == pytest.approx(ref)
    assert linear_probe.accuracy(logits, target.float(), topk=(1, 5)) == pytest.approx(ref)


# ---- item 11: a passing run leaves no temporary files behind ------------------------------------


def test_passing_run_removes_its_temporary_folders(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "test_inner.py").write_text(
        "def test_writes(tmp_path, tmp_path_factory):\n"
        "    (tmp_path / 'big.bin').write_bytes(bytes(2**20))\n"
        "    (tmp_path_factory.mktemp('shared') / 'big.bin').write_bytes(bytes(2**20))\n")
    env = {"PYTEST_DEBUG_TEMPROOT": str(tmp_path / "temproot"), "PATH": "/usr/bin:/bin"}
    (tmp_path / "temproot").mkdir()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                           str(root / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    left = [p for p in (tmp_path / "temproot").rglob("*") if p.is_file()]
    assert left == [], left
