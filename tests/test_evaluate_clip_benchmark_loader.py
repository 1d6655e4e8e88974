"""clip_benchmark's own CLI on a clipforge model (``--model_type clipforge``) vs clipforge's run_eval."""
import json
import math
import sys
import types

import pytest
import torch

from test_evaluate_utils import COLORS, make_image, numpy2_safe_float, write_wds

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    clipforge = pytest.importorskip("clipforge")
    root = tmp_path_factory.mktemp("cf")
    (root / "cf-eval-tiny.json").write_text(json.dumps(TINY))
    clipforge.add_model_config(root / "cf-eval-tiny.json")
    torch.manual_seed(0)
    model = clipforge.create_model("cf-eval-tiny")
    torch.save(model.state_dict(), root / "tiny.pt")
    return model, root / "tiny.pt"


def test_load_clipforge_loads_weights(tiny_checkpoint):
    from clipforge.evaluate.clip_benchmark_loader import load_clipforge

    ref, path = tiny_checkpoint
    model, transform, tokenizer = load_clipforge("cf-eval-tiny", str(path), "cpu")
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    img = transform(make_image((10, 200, 10), 0, size=50))
    assert img.shape == (3, 32, 32) and tokenizer(["a cat"]).shape == (1, 77)
    random_model, _, _ = load_clipforge("cf-eval-tiny", "none", "cpu")
    differs = [not torch.equal(a, b) for a, b in zip(random_model.parameters(), model.parameters())]
    assert any(differs)  # "none" builds random weights instead of reading the file


def test_clip_benchmark_cli_with_clipforge_model_type_matches_run_eval(tiny_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("clip_benchmark")
    try:
        import requests  # noqa: F401
    except ImportError:  # clip_benchmark 1.6.2 imports it (for downloads only) without declaring it
        monkeypatch.setitem(sys.modules, "requests", types.ModuleType("requests"))
    import clip_benchmark.cli as cli
    from clip_benchmark.metrics import zeroshot_classification

    from clipforge.evaluate.clip_benchmark_loader import load_clipforge, register_with_clip_benchmark
    from clipforge.evaluate.runner import run_eval

    numpy2_safe_float(monkeypatch, zeroshot_classification)
    _, weights = tiny_checkpoint
    names = list(COLORS)
    samples = [(f"s{i:03d}", make_image(COLORS[names[i % 3]], i), i % 3) for i in range(12)]
    root = write_wds(tmp_path / "colors", samples, retrieval=False, classnames=["red", "green", "blue"],
                     templates=["a photo of a {c}.", "a {c} thing."], nshards=1)
    register_with_clip_benchmark()
    register_with_clip_benchmark()  # idempotent
    out = tmp_path / "cb.json"
    monkeypatch.setattr("sys.argv", [
        "clip_benchmark", "eval", "--model_type", "clipforge", "--model", "cf-eval-tiny", "--pretrained",
        str(weights), "--dataset", "wds/colors", "--dataset_root", str(root), "--task", "zeroshot_classification",
        "--output", str(out), "--batch_size", "5", "--num_workers", "0", "--no_amp"])
    cli.main()
    theirs = json.loads(out.read_text())

    model, transform, tokenizer = load_clipforge("cf-eval-tiny", str(weights), "cpu")
    ours = run_eval("zeroshot_classification", model, tokenizer, transform, root, dataset_name="wds/colors",
                    model_name="cf-eval-tiny", pretrained=str(weights), batch_size=5, use_tqdm=False)
    assert list(ours) == list(theirs)
    assert {k: ours[k] for k in ("dataset", "model", "task", "language")} == \
        {k: theirs[k] for k in ("dataset", "model", "task", "language")}
    assert ours["metrics"]["acc1"] == theirs["metrics"]["acc1"]
    assert ours["metrics"]["mean_per_class_recall"] == pytest.approx(theirs["metrics"]["mean_per_class_recall"])
    assert math.isnan(ours["metrics"]["acc5"]) and math.isnan(theirs["metrics"]["acc5"])
