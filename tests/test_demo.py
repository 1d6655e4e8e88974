"""The embedded demo: a quick end-to-end run, its data split, its preprocessing and its saved model."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from PIL import Image

from clipforge import PreprocessConfig
from clipforge.data.synthetic import COLORS, SHAPES
from clipforge.demo import (DemoConfig, optim_settings, cycle_heldout, demo_main, images_to_tensor, make_demo_data,
                            quick_config,
                            run_demo, train)
from clipforge.demo_report import PLOTS
from clipforge.models.clip import CLIP
from clipforge.tokenizer import CLIPTokenizer
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
    # this seed's run scores ~64%, and 12.5% is chance.
    assert m["heldout_zeroshot_acc1"] > 0.5
    assert m["heldout_zeroshot_acc1_all_classes"] > 5 * m["all_classes_chance"]
    assert m["seen_zeroshot_acc1"] > 3 * m["seen_chance"]
    assert m["image_retrieval_recall@10"] > 5 * 10 / quick_config().n_val


def test_heldout_pairs_never_in_training_captions():
    shapes, splits = make_demo_data(quick_config())
    held = set(shapes.resolved_heldout())
    assert len(held) == 2 * quick_config().heldout_cycle and splits.heldout_labels
    train_pairs = set()
    for caption in splits.train.captions:
        words = caption.replace(",", " ").split()
        colours = [w for w in words if w in COLORS]
        kinds = [w for w in words if w in SHAPES]
        assert len(colours) == 1 and len(kinds) == 1, caption
        train_pairs.add((kinds[0], colours[0]))
    assert not train_pairs & held
    assert len(train_pairs) == len(SHAPES) * len(COLORS) - len(held)  # every seen pair is trained on
    held_names = {splits.class_names[c] for c in splits.heldout_labels}
    assert held_names == {f"{c} {s}" for s, c in held}
    assert set(splits.heldout.labels.tolist()) == set(splits.heldout_labels)


def test_cycle_heldout_needs_both_attributes():
    pairs = cycle_heldout(SHAPES, tuple(COLORS), 4)
    assert len(set(pairs)) == 8
    for attr in (0, 1):  # every shape and every colour of the held-out set occurs exactly twice
        values = [p[attr] for p in pairs]
        assert all(values.count(v) == 2 for v in values)
    with pytest.raises(ValueError):
        cycle_heldout(SHAPES, tuple(COLORS), 1)


def test_fast_preprocessing_equals_eval_transform():
    _, splits = make_demo_data(replace(quick_config(), image_size=64, n_train=4, n_val=1, n_heldout=1))
    transform = image_transform(PreprocessConfig(image_size=64), is_train=False)
    expected = torch.stack([transform(Image.fromarray(a)) for a in splits.train.images])
    torch.testing.assert_close(images_to_tensor(splits.train.images), expected, atol=1e-6, rtol=0)


def test_cosine_schedule():
    from clipforge.train import lr_at

    optim = optim_settings(replace(quick_config(), lr=1.0, warmup_steps=10))
    lrs = [lr_at(s, optim, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def test_training_is_deterministic():
    cfg = replace(quick_config(), n_train=64, steps=12, batch_size=16, lr=3e-3, warmup_steps=2)
    _, splits = make_demo_data(cfg)
    tokens = CLIPTokenizer(context_length=cfg.context_length)(splits.train.captions)
    runs = []
    for _ in range(2):
        torch.manual_seed(cfg.seed)
        model = CLIP(cfg.model_config())
        runs.append((train(model, splits.train.images, tokens, cfg, progress=False), model))
    (h1, m1), (h2, m2) = runs
    assert h1.loss == h2.loss and h1.logit_scale == h2.logit_scale
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert not m1.training
    assert len(h1.loss) == cfg.steps and all(s <= 100.0 for s in h1.logit_scale)


def test_saved_model_loads_in_open_clip(quick_run):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import load_file

    from clipforge import CLIPConfig, create_model

    out, _ = quick_run
    model_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    ref = open_clip.CLIP(**model_cfg)
    ref.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    ours = create_model(CLIPConfig.from_dict(model_cfg), pretrained=str(out / "model.safetensors"))
    ref.eval(), ours.eval()
    size = model_cfg["vision_cfg"]["image_size"]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    text = CLIPTokenizer(context_length=model_cfg["text_cfg"]["context_length"])(["a red circle", "blue star", "x"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_text(text), ref.encode_text(text), atol=1e-5, rtol=1e-5)


def test_demo_main_prints_heldout_accuracy_and_chance(monkeypatch, capsys, quick_run):
    _, metrics = quick_run
    calls = []

    def fake_run_demo(**kwargs):
        calls.append(kwargs)
        return metrics

    monkeypatch.setattr("clipforge.demo.run_demo", fake_run_demo)
    assert demo_main(out="somewhere", quick=True) == 0
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
