"""Eval datasets (ImageFolder, CSV, caption TSV, COCO JSON, WebDataset) and run_eval end to end."""
import json

import pytest
import torch

from test_evaluate_utils import (COLORS, captioned_items, make_image, numpy2_safe_float, tiny_model, tokenizer,
                                 transform, write_coco, write_image_folder, write_wds)

from clipforge.data import read_csv_records
from clipforge.evaluate.datasets import (captions_collate, captions_table, coco_captions, image_folder, labels_table,
                                         open_eval_dataset, wds_dataset)
from clipforge.transforms import ImageLoadError
from clipforge.evaluate.retrieval import evaluate_retrieval
from clipforge.evaluate.runner import run_eval


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _write_caption_tsv(root, items):
    root.mkdir(parents=True)
    lines = ["filepath\tcaption"]
    for fname, img, caps in items:
        img.save(root / fname)
        lines += [f"{fname}\t{c}" for c in caps]
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return root / "captions.tsv"


def test_image_folder_and_csv_agree(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=2)
    folder = image_folder(root, transform())
    assert folder.classnames == ["blue thing", "green thing", "red thing"]
    rows = ["filepath,label"] + [f"f/{p.parent.name}/{p.name},{p.parent.name.replace('_', ' ')}"
                                 for p in sorted(root.glob("*/*.png"))]
    (tmp_path / "by_name.csv").write_text("\n".join(rows) + "\n")
    table = labels_table(tmp_path / "by_name.csv", transform())
    assert table.classnames == folder.classnames
    assert [y for _, y in table.samples] == [y for _, y in folder.samples]
    x, y = table[0]
    assert x.shape == (3, 32, 32) and y == 0 and torch.equal(x, folder[0][0])
    (tmp_path / "by_index.csv").write_text("filepath,label\nf/red_thing/0.png,2\n")
    assert labels_table(tmp_path / "by_index.csv", classnames=["a", "b", "c"]).samples[0][1] == 2
    with pytest.raises(ValueError, match="outside"):
        labels_table(tmp_path / "by_index.csv", classnames=["a"])
    (tmp_path / "bad.csv").write_text("path,cls\nx.png,1\n")
    with pytest.raises(ValueError, match="lacks column"):
        labels_table(tmp_path / "bad.csv")


def test_caption_tsv_and_coco_group_captions_by_image(tmp_path):
    items = captioned_items(5)
    tsv = captions_table(_write_caption_tsv(tmp_path / "tsv", items), transform())
    coco = coco_captions(write_coco(tmp_path / "coco", items), transform=transform())
    for ds in (tsv, coco):
        assert len(ds) == 5  # COCO's uncaptioned image is dropped
        assert [caps for _, caps in ds.items] == [caps for _, _, caps in items]
    batch = captions_collate([tsv[0], tsv[1]])
    assert batch[0].shape == (2, 3, 32, 32) and batch[1] == [items[0][2], items[1][2]]


def test_tables_follow_the_data_readers_separator_rule(tmp_path):
    """A non-.csv/.tsv name goes by its header line; this module once read every such file as commas."""
    items = captioned_items(3)
    root = tmp_path / "t"
    root.mkdir()
    for fname, img, _ in items:
        img.save(root / fname)
    (root / "labels.txt").write_text("filepath\tlabel\n" + "".join(f"{f}\t{i}\n" for i, (f, _, _) in enumerate(items)))
    assert [y for _, y in labels_table(root / "labels.txt", classnames=["a", "b", "c"]).samples] == [0, 1, 2]
    (root / "caps.txt").write_text("filepath,caption\n" + "".join(f"{f},{c}\n" for f, _, caps in items for c in caps))
    table = captions_table(root / "caps.txt")
    assert [caps for _, caps in table.items] == [caps for _, _, caps in items]
    training = read_csv_records(root / "caps.txt", caption_key="caption")
    assert [(r.path, r.caption) for r in training] == [(p, c) for p, caps in table.items for c in caps]


def test_palette_png_reads_alike_from_every_layout(tmp_path):
    """Folder, table and WebDataset images all go through the one opener (RGB at open)."""
    img = make_image(COLORS["red_thing"], 7).convert("P", palette=1, colors=16)  # Image.Palette.ADAPTIVE
    (tmp_path / "f" / "red").mkdir(parents=True)
    img.save(tmp_path / "f" / "red" / "0.png")
    (tmp_path / "labels.csv").write_text("filepath,label\nf/red/0.png,0\n")
    root = write_wds(tmp_path / "wds", [("s0", img, 0)], retrieval=False, classnames=["red"], nshards=1)
    folder = image_folder(tmp_path / "f", transform())[0][0]
    table = labels_table(tmp_path / "labels.csv", transform())[0][0]
    shard = next(iter(wds_dataset(root, transform())))[0]
    assert folder.shape == (3, 32, 32) and torch.equal(folder, table) and torch.equal(folder, shard)


def test_coco_images_found_beside_the_annotations_folder(tmp_path):
    path = write_coco(tmp_path / "coco", captioned_items(2))
    moved = tmp_path / "coco" / "annotations" / path.name  # COCO's own layout
    moved.parent.mkdir()
    path.rename(moved)
    ds = coco_captions(moved, transform=transform())
    assert all(p.is_file() for p, _ in ds.items) and ds[1][0].shape == (3, 32, 32)


def test_broken_eval_image_raises_naming_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "labels.csv").write_text("filepath,label\nbroken.png,0\n")
    with pytest.raises(ImageLoadError, match=r"broken\.png.*UnidentifiedImageError"):
        labels_table(tmp_path / "labels.csv", transform())[0]


def test_wds_classification_and_retrieval(tmp_path):
    names = list(COLORS)
    samples = [(f"s{i:04d}", make_image(COLORS[names[i % 3]], i), i % 3) for i in range(7)]
    root = write_wds(tmp_path / "cls", samples, retrieval=False, classnames=["red", "green", "blue"],
                     templates=["a photo of a {c}.", "itap of a {c}."])
    ds = wds_dataset(root, transform())
    assert ds.classnames == ["red", "green", "blue"] and ds.templates == ["a photo of a {c}.", "itap of a {c}."]
    got = list(ds)
    assert sorted(y for _, y in got) == sorted(y for _, _, y in samples) and got[0][0].shape == (3, 32, 32)
    items = captioned_items(4)
    rroot = write_wds(tmp_path / "ret", [(f"s{i}", img, caps) for i, (_, img, caps) in enumerate(items)],
                      retrieval=True)
    rds = open_eval_dataset(rroot, "zeroshot_retrieval", transform())
    assert sorted(map(tuple, (c for _, c in rds))) == sorted(tuple(c) for _, _, c in items)
    with pytest.raises(ValueError, match="retrieval set"):
        open_eval_dataset(rroot, "zeroshot_classification", transform())


def test_retrieval_equals_clip_benchmark(model, tok, tmp_path):
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    ds = captions_table(_write_caption_tsv(tmp_path / "tsv", captioned_items(12)), transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=captions_collate)
    ours = evaluate_retrieval(model, tok, loader, recall_k=(1, 5, 10), use_tqdm=False)
    ref = zr.evaluate(model, loader, tok, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-7), key
    assert list(ours)[:6] == list(ref)
    assert 1 <= ours["image_retrieval_median_rank"] <= 12 and 1 <= ours["text_retrieval_mean_rank"] <= 24


@pytest.mark.parametrize("layout", ["folder", "csv", "wds"])
def test_run_eval_zero_shot_layouts_agree(model, tok, tmp_path, layout, monkeypatch):
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    numpy2_safe_float(monkeypatch, zc)
    root = write_image_folder(tmp_path / "f", per_class=3)
    folder = image_folder(root)
    if layout == "folder":
        path = root
    elif layout == "csv":
        path = tmp_path / "labels.csv"
        path.write_text("filepath,label\n" + "".join(f"{p},{y}\n" for p, y in folder.samples))
    else:
        samples = [(f"s{i:03d}", *folder[i]) for i in range(len(folder))]
        path = write_wds(tmp_path / "wds", samples, retrieval=False, classnames=folder.classnames)
    templates = ["a photo of a {}.", "a {} in a video game."]
    out = tmp_path / "out" / "{dataset}_{model}_{task}.json"
    result = run_eval("zeroshot_classification", model, tok, transform(), path, dataset_name="colors",
                      model_name="tiny", pretrained="none", output=out, batch_size=4,
                      classnames=folder.classnames, templates=templates, use_tqdm=False)
    written = json.loads((tmp_path / "out" / "colors_tiny_zeroshot_classification.json").read_text())
    assert set(written) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert written["dataset"] == "colors" and written["task"] == "zeroshot_classification"
    assert written["language"] == "en" and set(written["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert written["metrics"]["acc1"] == result["metrics"]["acc1"]
    ds = image_folder(root, transform())
    ds.classes = ds.classnames
    ref = zc.evaluate(model, torch.utils.data.DataLoader(ds, batch_size=4), tok, folder.classnames,
                      [t.replace("{}", "{c}") for t in templates], "cpu", amp=False)
    assert result["metrics"]["acc1"] == ref["acc1"]
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"])


@pytest.mark.parametrize("layout", ["tsv", "coco", "wds"])
def test_run_eval_retrieval_layouts_agree(model, tok, tmp_path, layout):
    items = captioned_items(6)
    if layout == "tsv":
        path = _write_caption_tsv(tmp_path / "tsv", items)
    elif layout == "coco":
        path = write_coco(tmp_path / "coco", items)
    else:  # one shard keeps the image order of the other layouts
        path = write_wds(tmp_path / "wds", [(f"s{i}", img, c) for i, (_, img, c) in enumerate(items)], True, nshards=1)
    result = run_eval("zeroshot_retrieval", model, tok, transform(), path, model_name="tiny", batch_size=4,
                      recall_k=(1, 2), use_tqdm=False)
    assert result["task"] == "zeroshot_retrieval" and "image_retrieval_recall@2" in result["metrics"]
    reference = evaluate_retrieval(model, tok, torch.utils.data.DataLoader(
        captions_table(_write_caption_tsv(tmp_path / "ref", items), transform()), batch_size=3,
        collate_fn=captions_collate), recall_k=(1, 2), use_tqdm=False)
    assert result["metrics"] == pytest.approx(reference, abs=1e-6)


def test_run_eval_linear_probe_on_folder_splits(model, tok, tmp_path):
    write_image_folder(tmp_path / "d" / "train", per_class=6)
    write_image_folder(tmp_path / "d" / "test", per_class=2)
    result = run_eval("linear_probe", model, tok, transform(), tmp_path / "d", batch_size=8, use_tqdm=False)
    m = result["metrics"]
    assert {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay"} <= set(m)
    assert m["lp_acc1"] == 1.0  # the three colours are trivially separable even with random features


def test_bad_inputs_raise_clear_errors(model, tok, tmp_path):
    with pytest.raises(ValueError, match="task must be"):
        run_eval("image_caption_selection", model, tok, transform(), tmp_path)
    with pytest.raises(ValueError, match="no text decoder"):  # captioning needs a CoCa; this is a CLIP
        run_eval("captioning", model, tok, transform(), tmp_path)
    with pytest.raises(FileNotFoundError):
        run_eval("zeroshot_retrieval", model, tok, transform(), tmp_path / "nothing.tsv")
    (tmp_path / "labels.csv").write_text("filepath,label\nx.png,0\n")
    with pytest.raises(ValueError, match="no class names"):
        run_eval("zeroshot_classification", model, tok, transform(), tmp_path / "labels.csv")
