"""clipforge.transforms must produce exactly OpenCLIP's tensors on real photos."""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.config import PreprocessConfig
from clipforge.transforms import (
    DRAFT_MARGIN,
    AugmentationConfig,
    ImageLoadError,
    image_transform,
    load_image,
)

skdata = pytest.importorskip("skimage.data")
oc_transform = pytest.importorskip("open_clip.transform")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN_DIR = SHARED / "assets" / "openai-preprocess"


def _rgba() -> Image.Image:
    rgb = skdata.astronaut()
    alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.float32).astype(np.uint8)
    alpha = np.broadcast_to(alpha[None, :], rgb.shape[:2])
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


IMAGES = {
    "astronaut": lambda: Image.fromarray(skdata.astronaut()),  # 512x512
    "coffee": lambda: Image.fromarray(skdata.coffee()),  # landscape 600x400
    "chelsea": lambda: Image.fromarray(skdata.chelsea()),  # odd width 451x300
    "rocket": lambda: Image.fromarray(skdata.rocket()),  # 640x427 JPEG-sourced
    "camera": lambda: Image.fromarray(skdata.camera()),  # grayscale "L"
    "rgba": _rgba,  # alpha gradient: exposes resize-before-convert ordering
    "portrait": lambda: Image.fromarray(skdata.coffee()).transpose(Image.Transpose.ROTATE_90),
}


@pytest.fixture(scope="module")
def images() -> dict:
    return {name: make() for name, make in IMAGES.items()}


def _openclip(cfg: PreprocessConfig, is_train: bool, aug: AugmentationConfig | None = None):
    oc_cfg = oc_transform.PreprocessCfg(
        size=cfg.image_size, mean=cfg.mean, std=cfg.std, interpolation=cfg.interpolation,
        resize_mode=cfg.resize_mode, fill_color=cfg.fill_color,
    )
    oc_aug = None if aug is None else oc_transform.AugmentationCfg(**vars(aug))
    return oc_transform.image_transform_v2(oc_cfg, is_train=is_train, aug_cfg=oc_aug)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [224, 336, (256, 192)], ids=str)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_matches_openclip(images, resize_mode, size, interpolation):
    cfg = PreprocessConfig(image_size=size, resize_mode=resize_mode, interpolation=interpolation)
    ours, theirs = image_transform(cfg, is_train=False), _openclip(cfg, is_train=False)
    expected_hw = (size, size) if isinstance(size, int) else size
    for name, img in images.items():
        out = ours(img)
        assert out.shape == (3, *expected_hw) and out.dtype == torch.float32, name
        assert torch.equal(out, theirs(img)), f"{name}: max diff {(out - theirs(img)).abs().max()}"


@pytest.mark.parametrize("fill_color", [0, 255])
def test_longest_pads_with_fill_color(images, fill_color):
    cfg = PreprocessConfig(resize_mode="longest", fill_color=fill_color, mean=(0.0,) * 3, std=(1.0,) * 3)
    out = image_transform(cfg, is_train=False)(images["coffee"])  # 3:2 landscape -> bars top/bottom
    assert torch.equal(out, _openclip(cfg, is_train=False)(images["coffee"]))
    assert torch.all(out[:, 0, :] == fill_color / 255) and torch.all(out[:, -1, :] == fill_color / 255)


def test_random_interpolation_is_bicubic_at_eval(images):
    rnd = image_transform(PreprocessConfig(interpolation="random"), is_train=False)(images["chelsea"])
    bic = image_transform(PreprocessConfig(interpolation="bicubic"), is_train=False)(images["chelsea"])
    bil = image_transform(PreprocessConfig(interpolation="bilinear"), is_train=False)(images["chelsea"])
    assert torch.equal(rnd, bic) and not torch.equal(bic, bil)


def test_golden_openai_preprocessing():
    """OpenAI's reference preprocessing also resizes with PIL bicubic: the match is exact."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden assets not present at {GOLDEN_DIR} (../shared is a development-only folder)")
    expected = torch.from_numpy(np.load(GOLDEN_DIR / "expected_preprocessed_image.npy")).reshape(3, 224, 224)
    with Image.open(GOLDEN_DIR / "franz-kafka.jpg") as img:
        out = image_transform(PreprocessConfig(), is_train=False)(img)
    assert torch.equal(out, expected), f"max diff {(out - expected).abs().max()}"


TRAIN_AUGS = {
    "default": None,
    "scale": AugmentationConfig(scale=(0.3, 1.0)),
    "jitter_gray": AugmentationConfig(
        color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.8, gray_scale_prob=0.5
    ),
}


def _seeded_outputs(transform, imgs, seed: int) -> list:
    torch.manual_seed(seed)
    random.seed(seed)
    return [transform(img) for img in imgs for _ in range(3)]


@pytest.mark.filterwarnings("ignore:Unused augmentation cfg items")  # OpenCLIP's spurious warning
@pytest.mark.parametrize("aug", TRAIN_AUGS.values(), ids=TRAIN_AUGS.keys())
@pytest.mark.parametrize("size", [224, (256, 192)], ids=str)
def test_train_matches_openclip_under_same_seed(images, aug, size):
    cfg = PreprocessConfig(image_size=size)
    imgs = [images["coffee"], images["camera"], images["rgba"]]
    ours = _seeded_outputs(image_transform(cfg, is_train=True, aug=aug), imgs, seed=7)
    theirs = _seeded_outputs(_openclip(cfg, is_train=True, aug=aug), imgs, seed=7)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    # The transform really is random: another seed gives other crops.
    other = _seeded_outputs(image_transform(cfg, is_train=True, aug=aug), imgs, seed=8)
    assert not all(torch.equal(a, b) for a, b in zip(ours, other))


def test_train_grayscale_is_applied(images):
    aug = AugmentationConfig(gray_scale_prob=1.0)
    cfg = PreprocessConfig(mean=(0.0,) * 3, std=(1.0,) * 3)
    out = image_transform(cfg, is_train=True, aug=aug)(images["coffee"])
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_train_with_timm_matches_openclip(images):
    pytest.importorskip("timm")
    aug = AugmentationConfig(use_timm=True, scale=(0.5, 1.0), re_prob=0.5, color_jitter=0.3)
    cfg = PreprocessConfig(image_size=(224, 192))
    imgs = [images["rocket"]]
    ours = _seeded_outputs(image_transform(cfg, is_train=True, aug=aug), imgs, seed=3)
    theirs = _seeded_outputs(_openclip(cfg, is_train=True, aug=aug), imgs, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_unused_train_settings_warn_and_bad_jitter_raises():
    with pytest.warns(UserWarning, match="re_prob"):
        image_transform(PreprocessConfig(), is_train=True, aug=AugmentationConfig(re_prob=0.25))
    with pytest.raises(ValueError, match="color_jitter"):
        aug = AugmentationConfig(color_jitter=0.4, color_jitter_prob=0.5)
        image_transform(PreprocessConfig(), is_train=True, aug=aug)


@pytest.mark.parametrize(
    "field,value", [("resize_mode", "crop"), ("interpolation", "nearest"), ("mode", "L")]
)
def test_invalid_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        image_transform(PreprocessConfig(**{field: value}), is_train=False)


@pytest.mark.parametrize("is_train", [False, True])
def test_transforms_pickle_for_dataloader_workers(images, is_train):
    aug = AugmentationConfig(color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.8, gray_scale_prob=0.2)
    transform = image_transform(PreprocessConfig(resize_mode="longest"), is_train=is_train, aug=aug)
    clone = pickle.loads(pickle.dumps(transform))
    torch.manual_seed(0), random.seed(0)
    a = transform(images["chelsea"])
    torch.manual_seed(0), random.seed(0)
    assert torch.equal(a, clone(images["chelsea"]))


# --- load_image -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    """A 2048x1536 JPEG made from a real photo (the astronaut, upscaled)."""
    img = Image.fromarray(skdata.astronaut()).resize((2048, 1536), Image.Resampling.BICUBIC)
    path = tmp_path_factory.mktemp("img") / "big.jpg"
    img.save(path, quality=95)
    return path


@pytest.mark.parametrize(
    "target,draft,expected",
    [
        (224, False, (2048, 1536)),  # draft off: always full decode
        (None, True, (2048, 1536)),  # no target: nothing to reduce towards
        (96, True, (256, 192)),  # 1/8 still keeps both sides >= 2*96
        (192, True, (512, 384)),  # 1/4 keeps >= 2*192 on both sides, 1/8 would not
        (224, True, (1024, 768)),  # 1/4 would give a 384 < 448 short side
        ((384, 160), True, (1024, 768)),  # (h, w): the height bounds the scale to 1/2
        ((512, 192), True, (2048, 1536)),  # 1536 < 2*512 high: no reduction
        (800, True, (2048, 1536)),  # 1536 < 2*800: no reduction allowed
    ],
)
def test_load_image_draft_reduces_only_when_allowed(big_jpeg, target, draft, expected):
    img = load_image(big_jpeg, target_size=target, draft=draft)
    assert img.mode == "RGB" and img.size == expected
    if img.size != (2048, 1536):  # whenever it reduced, the margin holds
        th, tw = (target, target) if isinstance(target, int) else target
        assert img.size[0] >= DRAFT_MARGIN * tw and img.size[1] >= DRAFT_MARGIN * th


def test_load_image_draft_output_close_to_full_decode(big_jpeg):
    """Drafting trades exactness for speed: right shape, small but nonzero deviation."""
    transform = image_transform(PreprocessConfig(image_size=224), is_train=False)
    full = transform(load_image(big_jpeg))
    fast = transform(load_image(big_jpeg, target_size=224, draft=True))
    assert fast.shape == full.shape == (3, 224, 224)
    # Normalised units (std ~0.27): mean deviation around 1/255 of the pixel range.
    assert 0 < (fast - full).abs().mean() < 0.05


def test_load_image_leaves_non_jpeg_alone_and_converts_to_rgb(tmp_path, images):
    path = tmp_path / "gray.png"
    images["camera"].save(path)
    img = load_image(path, target_size=64, draft=True)
    assert img.mode == "RGB" and img.size == (512, 512)


@pytest.mark.parametrize("content", [b"not an image at all", None], ids=["garbage", "truncated"])
def test_load_image_errors_name_the_file(tmp_path, big_jpeg, content):
    path = tmp_path / "broken_file.jpg"
    path.write_bytes(content if content is not None else big_jpeg.read_bytes()[:5000])
    with pytest.raises(ImageLoadError, match="broken_file.jpg"):
        load_image(path)


def test_load_image_reads_bytes_like_the_file(tmp_path, images):
    path = tmp_path / "rgba.png"
    images["rgba"].save(path)
    from_file, from_bytes = load_image(path), load_image(path.read_bytes())
    assert from_bytes.mode == "RGB" and np.array_equal(np.asarray(from_bytes), np.asarray(from_file))
    with pytest.raises(ImageLoadError, match=r"<19 bytes>: UnidentifiedImageError"):
        load_image(b"not an image at all")


def test_load_image_errors_say_why_and_are_os_and_value_errors(tmp_path):
    with pytest.raises(ImageLoadError, match=r"missing\.png.*FileNotFoundError") as info:
        load_image(tmp_path / "missing.png")
    # Callers that caught the opener's old errors (OSError in datasets, ValueError in classify) still do.
    assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_augmentation_config_from_json_dict():
    aug = AugmentationConfig.from_dict({"scale": [0.5, 1.0], "color_jitter": [0.4, 0.4, 0.4, 0.1]})
    assert aug == AugmentationConfig(scale=(0.5, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1))
    with pytest.raises(TypeError):
        AugmentationConfig.from_dict({"scael": [0.5, 1.0]})
