"""Zero-shot validation during training, the forgetting guard, and wise-ft choosing its alpha.

A tiny CLIP learns coloured shapes from captions; a held-out ImageFolder of coloured shapes (six
colours, four of them in the captions) is classified zero-shot. Logged accuracies are checked against
``clipforge eval``'s run on the saved model and against a brute-force computation with OpenCLIP.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
import clipforge.cli
from clipforge.checkpoints import read_checkpoint, save_safetensors
from clipforge.config import CLIPConfig
from clipforge.models.clip import CLIP
from clipforge.train import TrainConfig, interpolate_weights, load_config, train
from clipforge.train.checkpoint import list_checkpoints, read_training_checkpoint
from clipforge.train.logger import read_metrics, validation_figure
from clipforge.train.validate import build_zeroshot_task, read_templates, zeroshot_metrics
from clipforge.train.wise_ft import pick_alpha, sweep_paths, wise_ft_sweep

from train_utils import COLORS, TINY_MODEL, tiny_config, write_caption_tsv, write_yaml

HELD_OUT_COLORS = {**COLORS, "white": (235, 235, 235), "purple": (140, 40, 180)}
TEMPLATES = ["a {} square", "a {} stripe", "a picture of a square in {}"]
SHARED = Path("/work/shared")


def write_color_folder(root: Path, per_class: int = 4, size: int = 40) -> Path:
    """root/<colour>/<i>.jpg: squares and stripes of one colour on dark noise (an ImageFolder)."""
    rng = np.random.default_rng(7)
    for name, rgb in HELD_OUT_COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
            lo, hi = size // 4 + i % 3, 3 * size // 4
            if i % 2:
                img[lo:hi, lo:hi] = rgb
            else:
                img[:, lo:hi] = rgb
            Image.fromarray(img).save(root / name / f"{i:02d}.jpg", quality=90)
    return root


def _tiny_model(seed: int) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(CLIPConfig.from_dict(copy.deepcopy(TINY_MODEL)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    tsv = write_caption_tsv(root / "captions", n_images=32, captions_per_image=2)
    folder = write_color_folder(root / "held_out")
    names = root / "colors.json"
    names.write_text(json.dumps({"classes": sorted(HELD_OUT_COLORS), "templates": TEMPLATES}))
    init = root / "init.safetensors"
    save_safetensors(_tiny_model(seed=3).state_dict(), init)
    return {"root": root, "tsv": tsv, "folder": folder, "names": names, "init": init}


@pytest.fixture(scope="module")
def run(data):
    """Fine-tune the saved init for 3 epochs; retrieval and zero-shot validation every epoch, TensorBoard on."""
    cfg = tiny_config(data["root"], data["tsv"], epochs=3, tensorboard=True, model={"pretrained": str(data["init"])},
                      optim={"lr": 2e-3, "warmup_steps": 2},
                      val={"data": str(data["tsv"]), "batch_size": 16,
                           "zeroshot": {"data": str(data["folder"]), "classnames": str(data["names"]),
                                        "batch_size": 7}})
    path = write_yaml(data["root"] / "run.yaml", cfg)
    assert clipforge.cli.main(["train", "--config", str(path)]) == 0
    run_dir = data["root"] / "runs" / "run"
    return {"dir": run_dir, "rows": read_metrics(run_dir / "metrics.jsonl"),
            "summary": json.loads((run_dir / "summary.json").read_text())}


def _zs_rows(rows):
    return [r for r in rows if r["kind"] == "zeroshot"]


def _brute_force(model, tokenize, preprocess, folder: Path, classnames, templates):
    """Top-1/top-5 accuracy computed from scratch with OpenCLIP's model: mean prompt embedding per class."""
    with torch.no_grad():
        classes = []
        for name in classnames:
            t = model.encode_text(tokenize([tpl.format(name) for tpl in templates]))
            t = t / t.norm(dim=-1, keepdim=True)
            c = t.mean(dim=0)
            classes.append(c / c.norm())
        weights = torch.stack(classes)  # [C, D]
        hits1 = hits5 = n = 0
        for label, name in enumerate(sorted(p.name for p in folder.iterdir())):
            for file in sorted((folder / name).iterdir()):
                img = model.encode_image(preprocess(Image.open(file).convert("RGB")).unsqueeze(0))
                scores = (img / img.norm(dim=-1, keepdim=True)) @ weights.T  # [1, C]
                top = scores[0].argsort(descending=True).tolist()
                hits1 += top[0] == label
                hits5 += label in top[:5]
                n += 1
    return hits1 / n, hits5 / n


# -- training: measurement, parity, logging, plots -------------------------------------------------------
def test_zeroshot_logged_at_step_0_and_each_epoch_with_drops(run):
    zs = _zs_rows(run["rows"])
    assert [r["step"] for r in zs] == [0, 8, 16, 24]  # before any update, then every epoch
    base = zs[0]
    assert base["epoch"] == 0 and base["baseline_step"] == 0 and base["zeroshot_acc1_drop"] == 0.0
    for r in zs:
        for k in ("acc1", "acc5", "mean_per_class_recall"):
            assert r[f"zeroshot_{k}_drop"] == pytest.approx(base[f"zeroshot_{k}"] - r[f"zeroshot_{k}"], abs=0)
    assert zs[-1]["zeroshot_acc1"] > base["zeroshot_acc1"]  # it learned colours: a negative drop
    assert run["summary"]["zeroshot"]["zeroshot_acc1"] == zs[-1]["zeroshot_acc1"]
    assert run["summary"]["stopped"] is None
    # the baseline travels in the checkpoints, so a resumed run keeps measuring against step 0
    state = read_training_checkpoint(list_checkpoints(run["dir"])[-1])
    assert state["zeroshot_baseline"] == {"step": 0, **{k: v for k, v in base.items() if k.startswith("zeroshot_")
                                                       and not k.endswith("_drop")}}


def test_logged_accuracy_equals_clipforge_eval_and_brute_force(run, data):
    open_clip = pytest.importorskip("open_clip")
    from clipforge.evaluate.runner import run_eval

    classnames = sorted(HELD_OUT_COLORS)
    last = _zs_rows(run["rows"])[-1]
    final = f"local-dir:{run['dir'] / 'final'}"
    model, _, pre = clipforge.create_model_and_transforms(final)
    ours = run_eval("zeroshot_classification", model, clipforge.get_tokenizer(final), pre, data["folder"],
                    classnames=classnames, templates=TEMPLATES, use_tqdm=False)["metrics"]
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert last[f"zeroshot_{k}"] == ours[k], k
    ref, _, ref_pre = open_clip.create_model_and_transforms(final)
    acc1, acc5 = _brute_force(ref.eval(), open_clip.get_tokenizer(final), ref_pre, data["folder"], classnames, TEMPLATES)
    assert (last["zeroshot_acc1"], last["zeroshot_acc5"]) == (acc1, acc5)

    # step 0 is the starting weights, before any update
    start, _, _ = open_clip.create_model_and_transforms(final)
    start.load_state_dict(read_checkpoint(data["init"]))
    acc1, acc5 = _brute_force(start.eval(), open_clip.get_tokenizer(final), ref_pre, data["folder"], classnames,
                              TEMPLATES)
    first = _zs_rows(run["rows"])[0]
    assert (first["zeroshot_acc1"], first["zeroshot_acc5"]) == (acc1, acc5)


def test_tensorboard_and_validation_plot_carry_the_accuracy(run):
    zs = _zs_rows(run["rows"])
    EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator

    events = EventAccumulator(str(run["dir"] / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("zeroshot_acc1")]
    assert got == [(r["step"], pytest.approx(r["zeroshot_acc1"], abs=1e-7)) for r in zs]
    assert [e.step for e in events.Scalars("zeroshot_acc1_drop")] == [r["step"] for r in zs]

    assert (run["dir"] / "validation.png").stat().st_size > 0
    fig = validation_figure(run["rows"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["validation retrieval recall", "validation loss", "zero-shot accuracy"]
    lines = {line.get_label(): line for line in fig.axes[2].lines}
    assert list(lines["top-1"].get_xdata()) == [r["step"] for r in zs]
    assert list(lines["top-1"].get_ydata()) == [r["zeroshot_acc1"] for r in zs]
    assert list(lines["top-5"].get_ydata()) == [r["zeroshot_acc5"] for r in zs]
    assert list(lines["top-1 at step 0"].get_ydata()) == [zs[0]["zeroshot_acc1"]] * 2
    only_zs = validation_figure([r for r in run["rows"] if r["kind"] != "val"])
    assert [ax.get_title() for ax in only_zs.axes] == ["zero-shot accuracy"]
    assert validation_figure([r for r in run["rows"] if r["kind"] == "train"]) is None


# -- the forgetting guard --------------------------------------------------------------------------------
def test_stop_drop_stops_cleanly_saving_the_checkpoint_and_warn_drop_warns(run, data, tmp_path, capsys):
    """Fine-tuning the colour model on captions naming the wrong colours makes it forget, and the guard stops it."""
    names = list(COLORS)
    lines = data["tsv"].read_text().splitlines()
    wrong = [lines[0]] + [line.split("\t")[0] + "\t" + _swap_colors(line.split("\t")[1], names) for line in lines[1:]]
    bad_tsv = data["tsv"].parent / "wrong_colors.tsv"
    bad_tsv.write_text("\n".join(wrong) + "\n")
    final = run["dir"] / "final" / "open_clip_model.safetensors"
    cfg = tiny_config(tmp_path, bad_tsv, name="forget", max_steps=40, epochs=5, save_every_n_epochs=100,
                      model={"pretrained": str(final)}, optim={"lr": 4e-4, "warmup_steps": 1},
                      val={"zeroshot": {"data": str(data["folder"]), "classnames": str(data["names"]),
                                        "every_n_steps": 1, "every_n_epochs": None, "warn_drop": 0.1,
                                        "stop_drop": 0.3}})
    with pytest.warns(UserWarning, match=r"forgetting: zero-shot acc1 .* more than val\.zeroshot\.warn_drop=0\.1"):
        summary = train(TrainConfig.from_dict(cfg))
    out = capsys.readouterr().out
    rows = read_metrics(tmp_path / "runs" / "forget" / "metrics.jsonl")
    zs = _zs_rows(rows)
    assert zs[0]["step"] == 0 and zs[0]["zeroshot_acc1_drop"] == 0.0
    assert zs[-1]["zeroshot_acc1_drop"] > 0.3 and all(r["zeroshot_acc1_drop"] <= 0.3 for r in zs[:-1])
    assert summary["steps"] == zs[-1]["step"] < 40  # stopped at the validation that crossed the line
    assert "stopped by the forgetting guard" in summary["stopped"] and "val.zeroshot.stop_drop=0.3" in summary["stopped"]
    assert summary["stopped"] in out and summary["stopped"] in summary["notes"]
    assert [r for r in rows if r["kind"] == "stop"][0]["step"] == summary["steps"]
    ckpt = list_checkpoints(tmp_path / "runs" / "forget")[-1]
    assert read_training_checkpoint(ckpt)["step"] == summary["steps"]  # the checkpoint was saved at the stop
    assert (tmp_path / "runs" / "forget" / "final" / "open_clip_model.safetensors").is_file()
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] == summary["steps"]


def _swap_colors(caption: str, names):
    for i, name in enumerate(names):
        if name in caption:
            return caption.replace(name, names[(i + 1) % len(names)])
    return caption


# -- wise-ft choosing alpha --------------------------------------------------------------------------------
def test_wise_ft_sweep_cli_table_plot_and_endpoints(run, data, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    final = run["dir"] / "final"
    assert clipforge.cli.main(["wise-ft", str(data["init"]), str(final), "--out", str(out),
                               "--data", str(data["folder"]), "--classnames", str(data["names"]),
                               "--task_data", str(data["tsv"]), "--batch_size", "16"]) == 0
    assert "chose alpha=" in capsys.readouterr().out
    paths = sweep_paths(out)
    result = json.loads(paths["table"].read_text())
    table = result["table"]
    assert [r["alpha"] for r in table] == [i / 10 for i in range(11)]
    assert result["select"] == "average" and result["score_is"] == \
        "mean of held_out_acc1 and task_image_retrieval_recall@1"
    for r in table:
        assert r["score"] == pytest.approx((r["held_out_acc1"] + r["task_image_retrieval_recall@1"]) / 2, abs=1e-12)
    best = max(r["score"] for r in table)
    assert result["alpha"] == min(r["alpha"] for r in table if r["score"] == best)  # argmax, ties to the smaller
    # the endpoints are the two models: their scores are what training logged at step 0 and at the end
    zs = _zs_rows(run["rows"])
    assert table[0]["held_out_acc1"] == zs[0]["zeroshot_acc1"]
    assert table[-1]["held_out_acc1"] == zs[-1]["zeroshot_acc1"]
    val = [r for r in run["rows"] if r["kind"] == "val"][-1]
    assert table[-1]["task_image_retrieval_recall@1"] == pytest.approx(val["image_retrieval_recall@1"], abs=1e-9)
    zero, tuned = read_checkpoint(data["init"]), read_checkpoint(final / "open_clip_model.safetensors")
    merged = read_checkpoint(out)
    expected = interpolate_weights(zero, tuned, result["alpha"])
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # alpha 0 is the zero-shot model and alpha 1 the fine-tuned one, bit for bit
    for alpha, reference in (("0.0", zero), ("1.0", tuned)):
        end = tmp_path / f"end{alpha}.safetensors"
        assert clipforge.cli.main(["wise-ft", str(data["init"]), str(final), "--out", str(end), "--data",
                                   str(data["folder"]), "--classnames", str(data["names"]),
                                   "--alphas", f"[{alpha}]"]) == 0
        got = read_checkpoint(end)
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)


def test_wise_ft_sweep_finds_an_interior_alpha(run, data, tmp_path):
    """theta_0 = W + D and theta_1 = W - D for the trained W and large noise D: alpha 0.5 is W itself."""
    final = run["dir"] / "final"
    good = read_checkpoint(final / "open_clip_model.safetensors")
    g = torch.Generator().manual_seed(0)
    noise = {k: 4 * max(v.float().std().item() if v.numel() > 1 else 0.0, 0.05) * torch.randn(v.shape, generator=g)
             for k, v in good.items()}
    save_safetensors({k: v + noise[k] for k, v in good.items()}, tmp_path / "plus.safetensors")
    save_safetensors({k: v - noise[k] for k, v in good.items()}, tmp_path / "minus.safetensors")
    result = wise_ft_sweep(tmp_path / "plus.safetensors", tmp_path / "minus.safetensors", tmp_path / "m.pt",
                           data["folder"], classnames=str(data["names"]), model=f"local-dir:{final}",
                           alphas=(0.0, 0.25, 0.5, 0.75, 1.0), progress=False)
    table = {r["alpha"]: r["held_out_acc1"] for r in result["table"]}
    assert table[0.5] == _zs_rows(run["rows"])[-1]["zeroshot_acc1"]  # W, up to float rounding of W ± D
    assert table[0.5] > max(table[0.0], table[1.0])
    assert result["alpha"] == pick_alpha(result["table"])["alpha"] == max(table, key=lambda a: (table[a], -a))
    assert 0.0 < result["alpha"] < 1.0 and result["select"] == "held_out"
    assert (tmp_path / "m_sweep.png").is_file() and (tmp_path / "m_sweep.json").is_file()
    assert pick_alpha([{"alpha": 0.2, "score": 0.5}, {"alpha": 0.1, "score": 0.5}, {"alpha": 0.9, "score": 0.4}]) \
        == {"alpha": 0.1, "score": 0.5}


# -- settings and bad input -------------------------------------------------------------------------------
def test_zeroshot_settings_and_bad_input(data, tmp_path, capsys):
    cfg = load_config(None, [f"val.zeroshot.data={data['folder']}", "val.zeroshot.classnames=[a, b]",
                             "val.zeroshot.templates=cifar10", "val.zeroshot.every_n_steps=5"])
    assert cfg.val.zeroshot.classnames == ["a", "b"] and TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"config\.val\.zeroshot: stop_drop needs data"):
        load_config(None, ["val.zeroshot.stop_drop=0.1"])
    with pytest.raises(ValueError, match=r"config\.val\.zeroshot: warn_drop is an accuracy drop in \[0, 1\]"):
        load_config(None, [f"val.zeroshot.data={data['folder']}", "val.zeroshot.warn_drop=5"])
    with pytest.raises(ValueError, match=r"config\.val\.zeroshot: unknown key\(s\) \['frequency'\]"):
        load_config(None, ["val.zeroshot.frequency=1"])

    transform = clipforge.create_model_and_transforms(CLIPConfig.from_dict(copy.deepcopy(TINY_MODEL)))[2]
    with pytest.raises(ValueError, match=r"val\.zeroshot\.classnames: 2 names, but .* has 6 classes"):
        build_zeroshot_task(str(data["folder"]), transform, ["a", "b"], where="val.zeroshot")
    with pytest.raises(FileNotFoundError, match=r"val\.zeroshot\.classnames: no such file"):
        build_zeroshot_task(str(data["folder"]), transform, str(tmp_path / "nope.json"), where="val.zeroshot")
    with pytest.raises(ValueError, match=r"templates need a \{\}"):
        read_templates(["a photo"], where="val.zeroshot.templates")
    with pytest.raises(ValueError, match="neither a file nor a built-in template set"):
        read_templates("no-such-set", where="val.zeroshot.templates")
    task = build_zeroshot_task(str(data["folder"]), transform, str(data["names"]))
    assert task.templates == TEMPLATES and task.num_images == 24
    default = build_zeroshot_task(str(data["folder"]), transform)
    assert default.classnames == sorted(HELD_OUT_COLORS) and len(default.templates) == 80  # OpenAI's ImageNet set
    sub = build_zeroshot_task(str(data["folder"]), transform, max_images=5, batch_size=2)
    again = build_zeroshot_task(str(data["folder"]), transform, max_images=5, batch_size=2)
    assert sub.num_images == 5 and list(sub.loader.dataset.indices) == list(again.loader.dataset.indices)

    out = str(tmp_path / "x.safetensors")
    assert clipforge.cli.main(["wise-ft", str(data["init"]), str(data["init"]), "--out", out, "--alpha", "0.5",
                               "--data", str(data["folder"])]) == 2
    assert "--alpha fixes alpha, --data chooses it" in capsys.readouterr().err
    assert clipforge.cli.main(["wise-ft", str(data["init"]), str(data["init"]), "--out", out,
                               "--task_data", str(data["tsv"])]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert clipforge.cli.main(["wise-ft", str(data["init"]), str(data["init"]), "--out", out, "--data",
                               str(data["folder"])]) == 1
    assert "pass model" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "data" / "cifar10-test").is_dir(), reason="needs /work/shared's CIFAR-10 test set")
def test_cifar10_folder_with_shared_classnames_and_templates():
    open_clip = pytest.importorskip("open_clip")
    names = SHARED / "assets" / "cifar10_classes_templates.json"
    spec = json.loads(names.read_text())
    model = _tiny_model(seed=1).eval()
    transform = clipforge.create_model_and_transforms(CLIPConfig.from_dict(copy.deepcopy(TINY_MODEL)))[2]
    task = build_zeroshot_task(str(SHARED / "data" / "cifar10-test"), transform, str(names), max_images=40)
    assert task.classnames == spec["classes"] and task.templates == spec["templates"] and task.num_images == 40
    tok = clipforge.get_tokenizer(CLIPConfig.from_dict(copy.deepcopy(TINY_MODEL)))
    got = zeroshot_metrics(model, tok, task, torch.device("cpu"))
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    with torch.no_grad():
        weights = build_zero_shot_classifier(model, tok, spec["classes"], spec["templates"], device="cpu")
        images, labels = zip(*[task.loader.dataset[i] for i in range(40)])
        logits = model.encode_image(torch.stack(images), normalize=True) @ weights
    assert got["zeroshot_acc1"] == (logits.argmax(1) == torch.tensor(labels)).sum().item() / 40
