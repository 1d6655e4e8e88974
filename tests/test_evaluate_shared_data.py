"""Real images from ../shared (CIFAR-10 test, Flickr8k dev, COCO mini): clipforge vs clip_benchmark.

Skipped on machines without ../shared (a user's fresh clone). The model is a tiny random-init one, so
the numbers are near chance; the point is identical metrics on identical data and features.
"""
import json

import pytest
import torch

from test_evaluate_utils import SHARED, numpy2_safe_float, tiny_model, tokenizer, transform

from clipforge.evaluate.datasets import captions_collate, captions_table, coco_captions, image_folder
from clipforge.evaluate.runner import run_eval
from clipforge.evaluate.templates import get_classnames, get_templates

pytestmark = pytest.mark.skipif(not (SHARED / "data").is_dir(), reason=f"{SHARED}/data is absent")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def test_cifar10_subset_zero_shot_matches_clip_benchmark(model, tok, tmp_path, monkeypatch):
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    numpy2_safe_float(monkeypatch, zc)
    full = image_folder(SHARED / "data" / "cifar10-test")
    assert full.classnames == get_classnames("cifar10")
    subset = [s for c in range(10) for s in [x for x in full.samples if x[1] == c][:20]]  # 200 images
    table = tmp_path / "cifar10_subset.csv"
    table.write_text("filepath,label\n" + "".join(f"{p},{y}\n" for p, y in subset))
    result = run_eval("zeroshot_classification", model, tok, transform(), table, dataset_name="cifar10",
                      model_name="tiny", pretrained="random", output=tmp_path / "r.json",
                      classnames=get_classnames("cifar10"), batch_size=50, use_tqdm=False)
    assert json.loads((tmp_path / "r.json").read_text()) == result
    ds = image_folder(SHARED / "data" / "cifar10-test", transform())
    ds.samples, ds.classes = subset, ds.classnames
    loader = torch.utils.data.DataLoader(ds, batch_size=50)
    templates_c = [t.replace("{}", "{c}") for t in get_templates("cifar10")]  # the built-in set run_eval chose
    ref = zc.evaluate(model, loader, tok, ds.classnames, templates_c, "cpu", amp=False)
    for key in ("acc1", "acc5"):
        assert result["metrics"][key] == ref[key]
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"], abs=1e-12)


def test_flickr8k_dev_subset_retrieval_matches_clip_benchmark(model, tok, tmp_path):
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    dev = SHARED / "data" / "flickr8k" / "dev"
    full = captions_table(dev / "captions.tsv")
    assert len(full) == 1000 and all(len(c) == 5 for _, c in full.items)
    items = full.items[:200]
    subset = tmp_path / "flickr8k_dev_200.tsv"
    subset.write_text("filepath\tcaption\n" + "".join(f"{p}\t{c}\n" for p, caps in items for c in caps))
    result = run_eval("zeroshot_retrieval", model, tok, transform(), subset, model_name="tiny",
                      batch_size=64, use_tqdm=False)
    loader = torch.utils.data.DataLoader(captions_table(subset, transform()), batch_size=64,
                                         collate_fn=captions_collate)
    ref = zr.evaluate(model, loader, tok, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for key, value in ref.items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-7), key
    assert 0 < result["metrics"]["text_retrieval_recall@10"] < 1


def test_coco_mini_captions(model, tok):
    coco = coco_captions(SHARED / "data" / "coco-mini" / "captions_val2017.json", transform=transform())
    assert len(coco) == 79 and sum(len(c) for _, c in coco.items) == 395
    assert all(p.is_file() for p, _ in coco.items)
    loader = torch.utils.data.DataLoader(coco, batch_size=40, collate_fn=captions_collate)
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    from clipforge.evaluate.retrieval import evaluate_retrieval

    ours = evaluate_retrieval(model, tok, loader, use_tqdm=False)
    ref = zr.evaluate(model, loader, tok, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert all(ours[k] == pytest.approx(v, abs=1e-7) for k, v in ref.items())
