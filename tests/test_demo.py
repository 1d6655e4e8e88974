"""The embedded demo: a quick end-to-end run through the trainer, its data split, its preprocessing and its saved model."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge import PreprocessConfig
from clipforge.cli import demo as demo_cli
from clipforge.data.loader import build_dataset
from clipforge.data.synthetic import COLORS, SHAPES, make_shapes_splits
from clipforge.demo import DemoConfig, quick_config, run_demo
from clipforge.demo.report import PLOTS
from clipforge.demo.run import (TRAIN_DIR, cycle_heldout, evaluate, images_to_tensor, make_demo_data, train_config,
                                train_demo_model)
from clipforge.factory import get_tokenizer
from clipforge.models.clip import CLIP
from clipforge.tokenizer import CLIPTokenizer
from clipforge.train.config import load_config
from clipforge.train.logger import METRICS_FILE, read_metrics
from clipforge.transforms import image_transform


# The quick preset with 4x its steps: ~15 s on 2 idle cores, and enough to show composition.
QUICK_STEPS = 160


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    metrics = run_demo(out_dir=str(out), quick=True, steps=QUICK_STEPS, progress=False)
    return out, metrics


def test_quick_run_writes_report_and_plots(quick_run):
    out, metrics = quick_run
    report = (out / "report.md").read_text()
    for name in PLOTS.values():
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as img:
            assert img.width > 200 and img.height > 200
            # a blank canvas would be one colour; every plot draws something
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or range(2)) > 10
        assert f"]({name})" in report
    assert f"{100 * metrics['heldout_zeroshot_acc1']:.1f}%" in report
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)


def test_quick_run_records_what_repeats_it(quick_run):
    """Seed and thread count decide every number: both are in metrics.json and the report says how to rerun."""
    out, m = quick_run
    assert m["seed"] == 0 and m["torch_threads"] == torch.get_num_threads()
    report = (out / "report.md").read_text()
    assert "## Reproducibility" in report and f"--seed 0 --threads {m['torch_threads']}" in report
    assert "--threads 1" in report and "--seeds 5" in report


def test_threads_are_set_for_the_run_and_restored():
    from clipforge.demo.run import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="at least 1"):
        with torch_threads(0):
            pass


def test_demo_seeds_prints_and_writes_the_spread(monkeypatch, tmp_path, capsys):
    from clipforge.demo import run as demo_run

    figures = {0: 0.60, 1: 0.70, 2: 0.65}

    def fake_run_demo(out_dir, seed, **kwargs):
        keys = demo_run.SPREAD_METRICS
        return {**{k: figures[seed] for k in keys}, "seed": seed, "torch_threads": 1}

    monkeypatch.setattr(demo_run, "run_demo", fake_run_demo)
    assert demo_cli.main(out=str(tmp_path), seeds=3) == 0
    out = capsys.readouterr().out
    values = np.array(list(figures.values()))
    line = next(line for line in out.splitlines() if "heldout_zeroshot_acc1" in line)
    assert f"mean {values.mean():.1%}, std {values.std(ddof=1):.1%}, range 60.0%..70.0%" in line
    saved = json.loads((tmp_path / "spread.json").read_text())
    assert saved["seeds"] == [0, 1, 2]
    assert saved["spread"]["heldout_zeroshot_acc1"]["std"] == pytest.approx(values.std(ddof=1))


def test_quick_run_is_a_trainer_run(quick_run):
    # Training went through clipforge.train: its run folder, per-step log and saved config are there,
    # and the report's curves and final loss are that log's numbers.
    out, metrics = quick_run
    run = out / TRAIN_DIR
    rows = [r for r in read_metrics(run / METRICS_FILE) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, QUICK_STEPS + 1))
    assert metrics["final_loss"] == pytest.approx(np.mean([r["loss"] for r in rows[-10:]]))
    assert all(0 < r["logit_scale"] <= 100.0 for r in rows)
    assert load_config(run / "config.yaml").to_dict() == \
        train_config(replace(quick_config(), steps=QUICK_STEPS), run, progress=False).to_dict()
    hub = json.loads((run / "final" / "open_clip_config.json").read_text())
    assert hub["preprocess_cfg"]["size"] == quick_config().image_size  # the save the demo used to lack


def test_quick_run_metrics_are_in_range(quick_run):
    _, m = quick_run
    n_held = 2 * quick_config().heldout_cycle
    assert m["heldout_chance"] == pytest.approx(1 / n_held)
    assert m["all_classes_chance"] == pytest.approx(1 / (len(SHAPES) * len(COLORS)))
    assert m["seen_chance"] == pytest.approx(1 / (len(SHAPES) * len(COLORS) - n_held))
    rates = [k for k in m if "acc" in k or "recall" in k]
    assert len(rates) == 12
    for k in rates:
        assert 0.0 <= m[k] <= 1.0, k
    for d in ("image_retrieval", "text_retrieval"):
        assert m[f"{d}_recall@1"] <= m[f"{d}_recall@5"] <= m[f"{d}_recall@10"]
    # restricting candidates to the held-out classes can only help a held-out image
    assert m["heldout_zeroshot_acc1"] >= m["heldout_zeroshot_acc1_all_classes"]
    assert m["steps"] == QUICK_STEPS and math.isfinite(m["final_loss"])


def test_quick_run_composes_colour_and_shape(quick_run):
    _, m = quick_run
    # Among the held-out classes, colour alone or shape alone caps accuracy at 50% (see cycle_heldout);
    # this seed's run scores ~61%, and 12.5% is chance.
    assert m["heldout_zeroshot_acc1"] > 0.5
    assert m["heldout_zeroshot_acc1_all_classes"] > 5 * m["all_classes_chance"]
    assert m["seen_zeroshot_acc1"] > 3 * m["seen_chance"]
    assert m["image_retrieval_recall@10"] > 5 * 10 / quick_config().n_val


def test_heldout_pairs_never_in_training_captions(tmp_path):
    # What the trainer trains on (data.kind "shapes" of the demo's train config), not a copy of it.
    cfg = quick_config()
    data = train_config(cfg, tmp_path / "run").data
    train_set = build_dataset(data, lambda image: image, CLIPTokenizer(context_length=cfg.context_length))
    assert len(train_set) == cfg.n_train
    shapes, splits = make_demo_data(cfg)
    assert data.shapes == shapes
    held = set(shapes.resolved_heldout())
    assert len(held) == 2 * cfg.heldout_cycle and splits.heldout_labels
    train_pairs = set()
    for caption in train_set.data.captions:
        words = caption.replace(",", " ").split()
        colours = [w for w in words if w in COLORS]
        kinds = [w for w in words if w in SHAPES]
        assert len(colours) == 1 and len(kinds) == 1, caption
        train_pairs.add((kinds[0], colours[0]))
    assert not train_pairs & held
    assert len(train_pairs) == len(SHAPES) * len(COLORS) - len(held)  # every seen pair is trained on
    assert not set(train_set.data.labels.tolist()) & set(splits.heldout_labels)
    # the same training split the demo's own data helper drew before it trained through the trainer
    own = make_shapes_splits(shapes, cfg.n_train, 0, 0).train
    assert train_set.data.captions == own.captions and np.array_equal(train_set.data.images, own.images)
    held_names = {splits.class_names[c] for c in splits.heldout_labels}
    assert held_names == {f"{c} {s}" for s, c in held}
    assert set(splits.heldout.labels.tolist()) == set(splits.heldout_labels)
    assert len(splits.val_seen.captions) == cfg.n_val and len(splits.heldout.captions) == cfg.n_heldout


def test_cycle_heldout_needs_both_attributes():
    pairs = cycle_heldout(SHAPES, tuple(COLORS), 4)
    assert len(set(pairs)) == 8
    for attr in (0, 1):  # every shape and every colour of the held-out set occurs exactly twice
        values = [p[attr] for p in pairs]
        assert all(values.count(v) == 2 for v in values)
    with pytest.raises(ValueError):
        cycle_heldout(SHAPES, tuple(COLORS), 1)


def test_fast_preprocessing_equals_eval_transform():
    _, splits = make_demo_data(replace(quick_config(), image_size=64, n_val=4, n_heldout=1))
    images = splits.val_seen.images
    transform = image_transform(PreprocessConfig(image_size=64), is_train=False)
    expected = torch.stack([transform(Image.fromarray(a)) for a in images])
    torch.testing.assert_close(images_to_tensor(images), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="32"):
        images_to_tensor(images, PreprocessConfig(image_size=32))


def test_training_transform_is_the_eval_preprocessing(tmp_path):
    # The trainer's train transform with the demo's augmentation keeps each image whole at its size,
    # whatever its random crop draws: training sees what evaluation sees.
    cfg = replace(quick_config(), image_size=64, n_val=6, n_heldout=1)
    _, splits = make_demo_data(cfg)
    pp = PreprocessConfig(image_size=64)
    transform = image_transform(pp, True, train_config(cfg, tmp_path / "run").aug)
    torch.manual_seed(0)
    for _ in range(3):
        got = torch.stack([transform(Image.fromarray(a)) for a in splits.val_seen.images])
        torch.testing.assert_close(got, images_to_tensor(splits.val_seen.images, pp), atol=1e-6, rtol=0)


def test_cosine_schedule(tmp_path):
    from clipforge.train import lr_at

    cfg = replace(quick_config(), lr=1.0, warmup_steps=10, steps=110)
    settings = train_config(cfg, tmp_path / "run")
    optim = settings.optim
    assert settings.max_steps == 110 and optim.schedule == "cosine"
    lrs = [lr_at(s, optim, settings.max_steps) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def test_training_is_deterministic(tmp_path):
    cfg = replace(quick_config(), n_train=64, steps=12, batch_size=16, lr=3e-3, warmup_steps=2)
    shapes, splits = make_demo_data(cfg)
    runs = [train_demo_model(cfg, tmp_path / f"run{i}", progress=False) for i in range(2)]
    (m1, p1, h1), (m2, p2, h2) = runs
    assert h1.loss == h2.loss and h1.logit_scale == h2.logit_scale and h1.lr == h2.lr
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert evaluate(m1, splits, shapes, cfg, p1)[0] == evaluate(m2, splits, shapes, cfg, p2)[0]
    assert not m1.training
    assert len(h1.loss) == cfg.steps and all(s <= 100.0 for s in h1.logit_scale)
    # not constant: the model trained (a run that skipped its steps would also be repeatable)
    assert h1.loss[-1] < h1.loss[0] and not torch.equal(m1.logit_scale, CLIP(cfg.model_config()).logit_scale)


def test_saved_model_loads_in_open_clip(quick_run):
    open_clip = pytest.importorskip("open_clip")

    from clipforge import create_model

    out, _ = quick_run
    final = out / TRAIN_DIR / "final"
    ref, _, ref_preprocess = open_clip.create_model_and_transforms(f"local-dir:{final}")
    ours = create_model(f"local-dir:{final}")
    ref.eval(), ours.eval()
    model_cfg = json.loads((final / "open_clip_config.json").read_text())["model_cfg"]
    size = model_cfg["vision_cfg"]["image_size"]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    text = get_tokenizer(ours.cfg)(["a red circle", "blue star", "x"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_text(text), ref.encode_text(text), atol=1e-5, rtol=1e-5)
    # the saved preprocessing is the one the demo trained and evaluated with
    _, splits = make_demo_data(quick_config())
    shown = splits.val_seen.images[:4]
    torch.testing.assert_close(torch.stack([ref_preprocess(Image.fromarray(a)) for a in shown]),
                               images_to_tensor(shown), atol=1e-6, rtol=0)


def test_demo_main_prints_heldout_accuracy_and_chance(monkeypatch, capsys, quick_run):
    _, metrics = quick_run
    calls = []

    def fake_run_demo(**kwargs):
        calls.append(kwargs)
        return metrics

    monkeypatch.setattr(demo_cli, "run_demo", fake_run_demo)
    assert demo_cli.main(out="somewhere", quick=True) == 0
    assert calls == [{"out_dir": "somewhere", "steps": None, "seed": 0, "quick": True}]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{metrics['heldout_zeroshot_acc1']:.1%}" in last and f"chance {metrics['heldout_chance']:.1%}" in last


def test_default_config_fits_the_cpu_budget():
    # The full demo's shape, checked without running it: 64-px images, small towers, short context.
    cfg = DemoConfig()
    model_cfg = cfg.model_config()
    assert model_cfg.vision_cfg.image_size <= 64 and model_cfg.vision_cfg.is_resnet
    assert cfg.context_length == 32 and cfg.text_layers == 4
    n_params = sum(p.numel() for p in CLIP(model_cfg).parameters())
    assert n_params < 15_000_000
    vit = replace(cfg, vision_layers=4, vision_width=128).model_config().vision_cfg
    assert not vit.is_resnet and vit.grid_size == 8 and vit.width == 128
