"""Zero-shot classifier parity with OpenCLIP and clip_benchmark; built-in templates; classify_images."""
import pytest
import torch
from PIL import Image

from test_evaluate_utils import numpy2_safe_float, tiny_model, tokenizer, transform, write_image_folder

from clipforge.evaluate import templates as T
from clipforge.evaluate.datasets import image_folder
from clipforge.evaluate.zero_shot import (build_zero_shot_classifier, classify_images, evaluate_zero_shot,
                                          zero_shot_classify)

CLASSNAMES = ["cat", "dog", "red car", "tench", "goldfish", "airplane", "ship", "truck", "bird", "frog", "lamp",
              "horse", "sea"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.mark.parametrize("per_batch", [10, 4, None])
def test_classifier_bitwise_equal_to_open_clip(model, tok, per_batch):
    from open_clip.zero_shot_classifier import build_zero_shot_classifier as oc_build

    templates = T.get_templates("cifar10")
    ours = build_zero_shot_classifier(model, tok, CLASSNAMES, templates, num_classes_per_batch=per_batch)
    ref = oc_build(model, tok, CLASSNAMES, templates, num_classes_per_batch=per_batch, device="cpu")
    assert ours.shape == (32, len(CLASSNAMES))
    assert torch.equal(ours, ref)
    assert torch.allclose(ours.norm(dim=0), torch.ones(len(CLASSNAMES)), atol=1e-6)


def test_bucketed_classifier_matches_default_on_an_open_clip_model(model, tok):
    """Bucketing is an option of the one builder; a model without ``text.pooled_lengths`` keeps prompt order."""
    templates = T.get_templates("cifar10")
    plain = build_zero_shot_classifier(model, tok, CLASSNAMES, templates)
    bucketed = build_zero_shot_classifier(model, tok, CLASSNAMES, templates, bucket_size=7)
    assert bucketed.shape == plain.shape and (bucketed - plain).abs().max().item() <= 1e-6


def test_simple_templates_match_open_clip_lambdas(model, tok):
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES as oc_simple

    assert [t.format("X") for t in T.SIMPLE_IMAGENET_TEMPLATES] == [f("X") for f in oc_simple]
    assert set(T.SIMPLE_IMAGENET_TEMPLATES) <= set(T.OPENAI_IMAGENET_TEMPLATES)
    ours = build_zero_shot_classifier(model, tok, CLASSNAMES[:5], T.SIMPLE_IMAGENET_TEMPLATES)
    lam = build_zero_shot_classifier(model, tok, CLASSNAMES[:5], oc_simple)
    assert torch.equal(ours, lam)


def test_classifier_close_to_clip_benchmark_and_accepts_c_placeholder(model, tok):
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    templates_c = [t.replace("{}", "{c}") for t in T.get_templates("cifar10")]
    ref = zc.zero_shot_classifier(model, tok, CLASSNAMES, templates_c, "cpu", amp=False)
    ours = build_zero_shot_classifier(model, tok, CLASSNAMES, templates_c)
    # clip_benchmark encodes one class at a time; the arithmetic is the same up to matmul blocking
    assert (ours - ref).abs().max().item() < 1e-6


def test_builtin_sets_and_openai_assets():
    assert len(T.OPENAI_IMAGENET_TEMPLATES) == 80 and len(T.IMAGENET_CLASSNAMES) == 1000
    assert len(T.CIFAR_TEMPLATES) == 18 and len(T.CIFAR10_CLASSNAMES) == 10 and len(T.CIFAR100_CLASSNAMES) == 100
    assert T.IMAGENET_CLASSNAMES[:2] == ("tench", "goldfish") and "aquarium fish" in T.CIFAR100_CLASSNAMES
    assert all(t.count("{}") == 1 for t in T.OPENAI_IMAGENET_TEMPLATES + T.CIFAR_TEMPLATES)
    assert T.get_templates("cifar100") == T.get_templates("cifar10")
    with pytest.raises(KeyError, match="no built-in"):
        T.get_classnames("mnist")
    from importlib import resources
    licence = (resources.files("clipforge") / "assets" / "templates" / "LICENSE-openai-clip.txt").read_text()
    assert "Copyright (c) 2021 OpenAI" in licence and "MIT License" in licence


def test_open_clip_imagenet_metadata_matches_assets():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    assert tuple(IMAGENET_CLASSNAMES) == T.IMAGENET_CLASSNAMES
    assert tuple(f("X") for f in OPENAI_IMAGENET_TEMPLATES) == tuple(t.format("X") for t in T.OPENAI_IMAGENET_TEMPLATES)


def test_zero_shot_eval_equals_clip_benchmark(model, tok, tmp_path, monkeypatch):
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    numpy2_safe_float(monkeypatch, zc)
    ds = image_folder(write_image_folder(tmp_path / "f", per_class=3), transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    templates = ["a photo of a {}.", "a picture of the {}."]
    ours = evaluate_zero_shot(model, tok, loader, ds.classnames, templates, use_tqdm=False)
    ds.classes = ds.classnames  # the attribute clip_benchmark reads
    ref = zc.evaluate(model, loader, tok, ds.classnames, [t.replace("{}", "{c}") for t in templates], "cpu",
                      amp=False)
    assert ours["acc1"] == ref["acc1"] and ours["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"])
    assert ours["acc5"] != ours["acc5"] and ref["acc5"] != ref["acc5"]  # both NaN with 3 classes
    logits, targets = zero_shot_classify(model, build_zero_shot_classifier(model, tok, ds.classnames, templates),
                                         loader, use_tqdm=False)
    assert logits.shape == (9, 3) and targets.tolist() == [0] * 3 + [1] * 3 + [2] * 3


def test_classify_images_ranks_labels_and_reports_probabilities(model, tok, tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=1)
    paths = sorted(root.glob("*/*.png"))
    labels = ["red", "green", "blue", "a dog"]
    out = classify_images(model, tok, transform(), paths, labels, top_k=3, batch_size=2)
    assert [r["path"] for r in out] == [str(p) for p in paths]
    clf = build_zero_shot_classifier(model, tok, labels, ("a photo of a {}.",))
    for r, p in zip(out, paths):
        probs = [pr for _, pr in r["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and all(0 < pr < 1 for pr in probs)
        with torch.no_grad():
            img = transform()(Image.open(p).convert("RGB"))[None]
            expected = (model.logit_scale.exp() * model.encode_image(img, normalize=True) @ clf).softmax(-1)[0]
        best = int(expected.argmax())
        assert r["predictions"][0] == (labels[best], pytest.approx(expected[best].item(), abs=1e-6))
    assert len(classify_images(model, tok, transform(), paths[:1], labels[:2], top_k=5)[0]["predictions"]) == 2
    with pytest.raises(ValueError, match="cannot read image"):
        classify_images(model, tok, transform(), [tmp_path / "missing.png"], labels)
