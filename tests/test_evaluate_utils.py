"""Helpers for the evaluate tests: a tiny seeded OpenCLIP model and tiny generated image datasets.

Until clipforge's factory and tokenizer are complete the tests use an OpenCLIP model, which has the
same ``encode_image``/``encode_text``/``logit_scale`` surface.
"""
import json
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COLORS = {"red_thing": (220, 30, 30), "green_thing": (30, 200, 40), "blue_thing": (20, 40, 210)}


def numpy2_safe_float(monkeypatch, module) -> None:
    """clip_benchmark 1.6.2's ``accuracy`` calls ``float()`` on a 1-element array, which NumPy >= 2.x
    rejects; shadow ``float`` in that module only, leaving its metric logic untouched."""
    import builtins

    def _float(x=0.0):
        return builtins.float(np.asarray(x).reshape(())) if isinstance(x, np.ndarray) else builtins.float(x)

    monkeypatch.setattr(module, "float", _float, raising=False)


def tiny_model(seed: int = 0):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )
    return model.eval()


def tokenizer():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("ViT-B-32")


def transform():
    return T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(),
                      T.Normalize((0.481, 0.458, 0.408), (0.269, 0.261, 0.276))])


def make_image(color, seed: int, size: int = 40) -> Image.Image:
    """A noisy patch of ``color``: distinct pixels per image, still clearly of one colour."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8))


def write_image_folder(root: Path, per_class: int = 4) -> Path:
    for c, (name, color) in enumerate(COLORS.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            make_image(color, seed=100 * c + i).save(root / name / f"{i}.png")
    return root


def captioned_items(n_images: int = 6):
    """(filename, image, captions) with 1..3 captions per image, so caption counts differ."""
    items = []
    names = list(COLORS)
    for i in range(n_images):
        name = names[i % len(names)]
        caps = [f"a {name.replace('_', ' ')} number {i} view {j}" for j in range(1 + i % 3)]
        items.append((f"img{i}.png", make_image(COLORS[name], seed=1000 + i), caps))
    return items


def write_wds(root: Path, samples, retrieval: bool, classnames=None, templates=None, nshards: int = 2) -> Path:
    """clip_benchmark's WebDataset layout: test/{0..n-1}.tar, test/nshards.txt, metadata files at root."""
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text(str(nshards))
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval")
    if classnames:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    for shard in range(nshards):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for key, image, target in samples[shard::nshards]:
                buf = BytesIO()
                image.save(buf, format="PNG")
                payload = "\n".join(target) if retrieval else str(target)
                for ext, data in (("png", buf.getvalue()), ("txt" if retrieval else "cls", payload.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, BytesIO(data))
    return root


def write_coco(root: Path, items) -> Path:
    """COCO captions JSON beside a val2017/ folder, with one extra image that has no caption."""
    (root / "val2017").mkdir(parents=True)
    images, anns = [], []
    for i, (fname, img, caps) in enumerate(items):
        img.save(root / "val2017" / fname)
        images.append({"id": 10 + i, "file_name": fname})
        anns.extend({"id": len(anns), "image_id": 10 + i, "caption": c} for c in caps)
    images.append({"id": 999, "file_name": "uncaptioned.png"})
    path = root / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_generated_images_differ_but_keep_their_colour(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=2)
    a = np.asarray(Image.open(root / "red_thing" / "0.png")).astype(float)
    b = np.asarray(Image.open(root / "red_thing" / "1.png")).astype(float)
    assert np.abs(a - b).mean() > 5
    assert a[..., 0].mean() > 150 > a[..., 2].mean()
