"""Captioning: clip_benchmark's metrics (its own code as the reference), ``clipforge caption`` and
``clipforge eval --task captioning``.

pycocoevalcap runs Java (the PTB tokenizer and METEOR, whose jar takes seconds to start): the caption
sets are tiny and one METEOR process serves every computation, clip_benchmark's included.
"""
import json
import shutil
from typing import Dict, List

import pytest
import torch
from conftest import shared_path
from test_evaluate_utils import captioned_items, numpy2_safe_float, write_coco, write_image_folder

import clipforge
from clipforge.checkpoints import save_torch
from clipforge.cli import main
from clipforge.data.captions import CaptionGroups, read_coco_records
from clipforge.evaluate.captioning import (CAPTION_METRICS, caption_metrics, decode_captions,
                                           evaluate_captioning, meteor_scorer, require_captioner)
from clipforge.evaluate.datasets import captions_collate, captions_table, image_folder
from clipforge.evaluate.runner import run_eval
from clipforge.transforms import load_image

pytest.importorskip("pycocoevalcap")
pytest.importorskip("clip_benchmark")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need java")

# Predictions with case, punctuation and a miss, to exercise the PTB tokenizer and every scorer.
PREDICTIONS = ["a cat sits on a sofa.", "A man climbing a rock wall", "two dogs running in the snow",
               "a red car parked on the street", "a bowl of soup"]
REFERENCES = [["A cat lying on a sofa.", "a grey cat on a couch", "The cat is sleeping."],
              ["A man in a red jacket climbs a rock wall .", "someone climbing"],
              ["Two dogs play in the snow.", "Dogs run through snow!", "two dogs, snow"],
              ["A red car on a street", "a parked car"],
              ["a rocket on the launch pad"]]


class _TokenCaptioner(torch.nn.Module):
    """Stands in for a captioning model where only ``generate``'s tokens matter: batch by batch it
    returns the fixed captions tokenized by open_clip (SOT ... EOT, zero padded), as CoCa's output."""

    def __init__(self, captions: List[str]):
        super().__init__()
        self.captions = list(captions)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for model_device
        self.calls: List[Dict] = []

    def generate(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        import open_clip

        self.calls.append(kwargs)
        batch, self.captions = self.captions[:len(images)], self.captions[len(images):]
        return open_clip.tokenize(batch)


def _batches(batch_size: int = 2):
    images = torch.zeros(len(PREDICTIONS), 3, 8, 8)
    return [(images[i:i + batch_size], REFERENCES[i:i + batch_size]) for i in range(0, len(PREDICTIONS), batch_size)]


class _NoSpice:
    """SPICE's place in clip_benchmark's scorer list (the real one downloads CoreNLP)."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


def _clip_benchmark_captioning(model, loader, monkeypatch) -> Dict[str, float]:
    """clip_benchmark 1.6.2's captioning task, SPICE left out and METEOR's jar started once."""
    from clip_benchmark.metrics import captioning as cb

    monkeypatch.setattr(cb, "Spice", _NoSpice)
    monkeypatch.setattr(cb, "Meteor", meteor_scorer)
    metrics = cb.evaluate(model, loader, batch_size=None, device="cpu", transform=None)
    metrics.pop("SPICE")
    return metrics


@needs_java
def test_metrics_equal_clip_benchmark(monkeypatch):
    """The same generated tokens through clip_benchmark and through clipforge: the same floats."""
    clip_benchmark_metrics = _clip_benchmark_captioning(_TokenCaptioner(PREDICTIONS), _batches(), monkeypatch)
    model = _TokenCaptioner(PREDICTIONS)
    tokenizer = clipforge.get_tokenizer("ViT-B-32")
    ours = evaluate_captioning(model, tokenizer, _batches(), use_tqdm=False, num_beams=3)
    assert list(ours) == list(CAPTION_METRICS) == list(clip_benchmark_metrics)
    assert ours == clip_benchmark_metrics  # equal, not just close
    assert 0.0 < ours["Bleu_4"] < ours["Bleu_1"] < 1.0 and ours["CIDEr"] > 0.0
    assert model.calls == [{"num_beams": 3}] * 3  # generate kwargs passed through, one call per batch


@needs_java
def test_human_captions_on_coco_mini_equal_clip_benchmark(monkeypatch):
    """Real captions: each COCO image's first caption scored against its other four, both ways."""
    groups = CaptionGroups.from_records(read_coco_records(shared_path("data", "coco-mini", "captions_val2017.json")))
    first = [caps[0] for caps in groups.captions][:40]
    others = [caps[1:] for caps in groups.captions][:40]
    images = torch.zeros(len(first), 3, 8, 8)
    batches = [(images[i:i + 16], others[i:i + 16]) for i in range(0, len(first), 16)]
    ref = _clip_benchmark_captioning(_TokenCaptioner(first), batches, monkeypatch)
    ours = evaluate_captioning(_TokenCaptioner(first), clipforge.get_tokenizer("ViT-B-32"), batches, use_tqdm=False)
    assert ours == ref
    assert 0.15 < ours["Bleu_4"] < ours["Bleu_1"] < 1.0 and 0.5 < ours["CIDEr"] < 2.0  # human-level COCO scores


def test_decode_cuts_at_end_of_text_like_clip_benchmark():
    import open_clip
    from open_clip.tokenizer import _tokenizer

    tokenizer = clipforge.get_tokenizer("ViT-B-32")
    tokens = open_clip.tokenize(["Hello, World!", "a  photo of an astronaut ", ""], context_length=16)
    tokens[0, 8:] = 320  # text after end-of-text ("a") must be dropped
    expected = [_tokenizer.decode(t).split("<end_of_text>")[0].replace("<start_of_text>", "").strip()
                for t in tokens.numpy()]
    assert decode_captions(tokenizer, tokens) == expected == ["hello , world !", "a photo of an astronaut", ""]


def test_metric_inputs_are_checked(monkeypatch):
    from clipforge.evaluate import captioning

    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)  # a machine without Java
    with pytest.raises(RuntimeError, match="default-jre-headless"):
        caption_metrics({0: "a cat"}, {0: ["a cat"]})
    with pytest.raises(ValueError, match="same ids"):
        caption_metrics({0: "a cat", 1: "a dog"}, {0: ["a cat"]})
    with pytest.raises(ValueError, match="without any reference"):
        caption_metrics({0: "a cat"}, {0: []})
    with pytest.raises(ValueError, match="no text decoder"):
        require_captioner(torch.nn.Linear(2, 2), "ViT-B-32")


# A seeded tiny CoCa in OpenCLIP's config format (random weights: captions are word salad, which is
# all these tests need). Context 76 + CLS = 77, as OpenCLIP's CoCa configs.
TINY_COCA = {"embed_dim": 32, "custom_text": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                            "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
             "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                          "embed_cls": True, "output_tokens": True},
             "multimodal_cfg": {"context_length": 76, "width": 32, "heads": 2, "layers": 1}}
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                             "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def coca(tmp_path_factory):
    """(clipforge CoCa in eval mode, its eval transform, tokenizer, checkpoint path) for ``cap-tiny``."""
    root = tmp_path_factory.mktemp("coca")
    for name, cfg in (("cap-tiny", TINY_COCA), ("cap-clip", TINY_CLIP)):
        (root / f"{name}.json").write_text(json.dumps(cfg))
        clipforge.add_model_config(root / f"{name}.json")
    torch.manual_seed(0)
    model, _, transform = clipforge.create_model_and_transforms("cap-tiny")
    save_torch(model.state_dict(), root / "coca.pt")
    save_torch(clipforge.create_model("cap-clip").state_dict(), root / "clip.pt")
    return model.eval(), transform, clipforge.get_tokenizer("cap-tiny"), root


def _reference_captions(model, transform, paths, **kwargs) -> List[str]:
    """The model's own ``generate`` on the batch, decoded by clip_benchmark's rule with open_clip's tokenizer."""
    from open_clip.tokenizer import _tokenizer

    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        tokens = model.generate(images, **kwargs)
    return [_tokenizer.decode(t).split("<end_of_text>")[0].replace("<start_of_text>", "").strip()
            for t in tokens.numpy()]


def test_caption_cli_captions_each_image_and_reports_a_bad_one(coca, photos, tmp_path, capsys):
    model, transform, _, root = coca
    paths = [str(tmp_path / f"img{i}.jpg") for i in range(2)]
    for photo, path in zip(photos, paths):
        photo.save(path)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    expected = _reference_captions(model, transform, paths, num_beams=3, seq_len=12)
    assert all(expected) and expected[0] != expected[1]
    code = main(["caption", paths[0], str(bad), paths[1], "--model", "cap-tiny", "--pretrained",
                 str(root / "coca.pt"), "--beams", "3", "--seq-len", "12", "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and "broken.jpg" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == [paths[0], str(bad), paths[1]]
    assert [rows[0]["caption"], rows[2]["caption"]] == expected
    assert "broken.jpg" in rows[1]["error"] and "caption" not in rows[1]
    # plain output: path TAB caption, one image per generate call
    assert main(["caption", *paths, "--model", "cap-tiny", "--pretrained", str(root / "coca.pt"), "--beams", "3",
                 "--seq-len", "12", "--batch-size", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{p}\t{c}" for p, c in zip(paths, expected)]


def test_caption_and_eval_refuse_a_clip_model(coca, photos, tmp_path, capsys):
    root = coca[3]
    photos[0].save(tmp_path / "a.jpg")
    assert main(["caption", str(tmp_path / "a.jpg"), "--model", "cap-clip", "--pretrained",
                 str(root / "clip.pt")]) == 2
    assert "'cap-clip'" in capsys.readouterr().err
    tsv = tmp_path / "c.tsv"
    tsv.write_text("filepath\tcaption\na.jpg\ta photo\n")
    assert main(["eval", "--task", "captioning", "--model", "cap-clip", "--dataset", str(tsv)]) == 2
    assert "no text decoder" in capsys.readouterr().err


@needs_java
def test_eval_captioning_cli_equals_clip_benchmark_on_the_model(coca, tmp_path, monkeypatch):
    """``clipforge eval --task captioning`` on a COCO JSON vs clip_benchmark's captioning task run on
    the same model over a TSV of the same images and captions."""
    model, transform, _, root = coca
    items = captioned_items(3)
    for fname, img, _ in items:
        img.save(tmp_path / fname)
    settings = {"num_beams": 3, "seq_len": 12}  # OpenCLIP's defaults are 6 and 30: slower, no more telling
    own = _reference_captions(model, transform, [tmp_path / f for f, _, _ in items], **settings)
    items[0][2].append(own[0])  # a reference equal to the model's caption, so the scores are not all 0
    items[2][2].append(" ".join(own[2].split()[:3]))
    coco = write_coco(tmp_path / "coco", items)
    lines = ["filepath\tcaption"] + [f"{f}\t{c}" for f, _, caps in items for c in caps]
    (tmp_path / "c.tsv").write_text("\n".join(lines) + "\n")

    out = tmp_path / "result.json"
    assert main(["eval", "--task", "captioning", "--model", "cap-tiny", "--pretrained", str(root / "coca.pt"),
                 "--dataset", str(coco), "--output", str(out), "--batch-size", "2", "--beams", "3",
                 "--seq-len", "12"]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "captioning" and list(result["metrics"]) == list(CAPTION_METRICS)

    loader = torch.utils.data.DataLoader(captions_table(tmp_path / "c.tsv", transform), batch_size=2,
                                         collate_fn=captions_collate)
    class Captioner:  # clip_benchmark calls generate(images) with generate's defaults; these are the settings
        def generate(self, images):
            return model.generate(images, **settings)

    ref = _clip_benchmark_captioning(Captioner(), loader, monkeypatch)
    assert result["metrics"] == ref
    assert ref["Bleu_1"] > 0.1 and ref["CIDEr"] > 0.1


def _open_clip_twin(model):
    """open_clip's CoCa built from the same config, holding ``model``'s weights (names are shared)."""
    open_clip = pytest.importorskip("open_clip")
    twin = open_clip.CoCa(embed_dim=TINY_COCA["embed_dim"], multimodal_cfg=TINY_COCA["multimodal_cfg"],
                          text_cfg=TINY_COCA["text_cfg"], vision_cfg=TINY_COCA["vision_cfg"])
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_zero_shot_and_retrieval_on_coca_equal_clip_benchmark_on_open_clip(coca, tmp_path, monkeypatch):
    import open_clip
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark.metrics import zeroshot_retrieval as zr

    model, transform, tokenizer, _ = coca
    twin, oc_tok = _open_clip_twin(model), open_clip.get_tokenizer("coca_ViT-B-32")

    items = captioned_items(6)
    (tmp_path / "r").mkdir()
    for fname, img, _ in items:
        img.save(tmp_path / "r" / fname)
    lines = ["filepath\tcaption"] + [f"{f}\t{c}" for f, _, caps in items for c in caps]
    (tmp_path / "r" / "c.tsv").write_text("\n".join(lines) + "\n")
    ours = run_eval("zeroshot_retrieval", model, tokenizer, transform, tmp_path / "r" / "c.tsv",
                    recall_k=(1, 2), batch_size=4, use_tqdm=False)["metrics"]
    loader = torch.utils.data.DataLoader(captions_table(tmp_path / "r" / "c.tsv", transform), batch_size=4,
                                         collate_fn=captions_collate)
    ref = zr.evaluate(twin, loader, oc_tok, "cpu", amp=False, recall_k_list=[1, 2])
    assert {k: ours[k] for k in ref} == pytest.approx(ref, abs=1e-7)

    numpy2_safe_float(monkeypatch, zc)
    folder = write_image_folder(tmp_path / "f", per_class=3)
    templates = ["a photo of a {}.", "a {} in a video game."]
    ours = run_eval("zeroshot_classification", model, tokenizer, transform, folder, batch_size=4,
                    templates=templates, use_tqdm=False)["metrics"]
    ds = image_folder(folder, transform)
    ds.classes = ds.classnames
    ref = zc.evaluate(twin, torch.utils.data.DataLoader(ds, batch_size=4), oc_tok, ds.classnames,
                      [t.replace("{}", "{c}") for t in templates], "cpu", amp=False)
    assert ours["acc1"] == ref["acc1"]
    assert ours["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"])
    # the classifier itself, not only its accuracy
    from open_clip.zero_shot_classifier import build_zero_shot_classifier as oc_build

    from clipforge.evaluate.zero_shot import build_zero_shot_classifier
    mine = build_zero_shot_classifier(model, tokenizer, ds.classnames, templates)
    theirs = oc_build(twin, oc_tok, ds.classnames, templates, device="cpu")
    assert (mine - theirs).abs().max().item() <= 1e-5
