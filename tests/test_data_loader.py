import time

import numpy as np
import pytest
import torch

from clipforge.data import (DataConfig, RandomCaptionDataset, ResumableDistributedSampler, ShapesConfig,
                            ShapesDataset, build_train_loader, generate_shapes, make_shapes_splits, read_caption_file,
                            render_shape, write_shards)
from test_data_common import detok, make_caption_folder, small_transform, toy_tokenize, write_tsv


def test_sampler_disjoint_deterministic_and_padded():
    parts = [list(ResumableDistributedSampler(10, r, 3, seed=7)) for r in range(3)]
    assert all(len(p) == 4 for p in parts)  # 10 padded to 12
    assert set().union(*parts) == set(range(10))
    assert parts[0] == list(ResumableDistributedSampler(10, 0, 3, seed=7))
    s = ResumableDistributedSampler(10, 0, 1, seed=7)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0 and sorted(s) == list(range(10))
    dropped = [list(ResumableDistributedSampler(10, r, 3, seed=7, drop_last=True)) for r in range(3)]
    assert all(len(p) == 3 for p in dropped) and len(set().union(*dropped)) == 9


def test_resume_from_batch_index_matches_full_epoch(tmp_path):
    cfg = DataConfig(kind="synthetic", num_samples=50, image_size=4, context_length=8)
    def run(start):
        loader = build_train_loader(cfg, None, None, batch_size=4, rank=1, world_size=2, seed=3, workers=0)
        loader.set_epoch(2, start_batch=start)
        return [t for _, t in loader]
    full, resumed = run(0), run(3)
    assert len(full) == 6 and len(resumed) == 3  # 25 per rank // 4
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))


def test_synthetic_random_dataset_is_deterministic():
    ds = RandomCaptionDataset(5, image_size=8, context_length=16, vocab_size=100, seed=1)
    img, tok = ds[3]
    assert img.shape == (3, 8, 8) and tok.shape == (16,)
    assert torch.equal(ds[3][0], RandomCaptionDataset(5, 8, 16, 100, seed=1)[3][0])
    assert tok[0] == 98 and tok.argmax() == (tok == 99).nonzero()[0, 0]  # SOT ... EOT
    with pytest.raises(IndexError):
        ds[5]


def test_shapes_determinism_and_heldout_disjoint():
    cfg = ShapesConfig(image_size=32, seed=4)
    a, b = make_shapes_splits(cfg, 300, 50, 50), make_shapes_splits(cfg, 300, 50, 50)
    assert np.array_equal(a.train.images, b.train.images) and a.train.captions == b.train.captions
    c = make_shapes_splits(ShapesConfig(image_size=32, seed=5), 300, 50, 50)
    assert not np.array_equal(a.train.images, c.train.images)
    held = set(a.heldout_labels)
    assert held and held.isdisjoint(a.train.labels) and set(a.heldout.labels) <= held
    assert set(a.val_seen.labels) <= set(a.seen_labels)
    held_names = [a.class_names[i] for i in held]
    assert not any(n in cap for cap in a.train.captions for n in held_names)
    assert all(a.class_names[l] in cap for l, cap in zip(a.heldout.labels, a.heldout.captions))
    assert len(set(a.train.captions)) > 100  # varied wordings and attributes


def test_shapes_render_attributes():
    rng = np.random.default_rng(0)
    red_left = render_shape("circle", "red", "large", "left", "black", 64, rng).astype(int)
    redness = (red_left[..., 0] > 150) & (red_left[..., 1] < 100)
    cols = np.nonzero(redness)[1]
    assert cols.mean() < 28 and redness.sum() > 300
    small = render_shape("circle", "red", "small", "left", "black", 64, rng).astype(int)
    assert ((small[..., 0] > 150) & (small[..., 1] < 100)).sum() < redness.sum() / 2


def test_shapes_generation_speed_and_dataset():
    cfg = ShapesConfig(image_size=64)
    t = time.perf_counter()
    data = generate_shapes(cfg, 1000, [("star", "blue")], stream=0)
    assert time.perf_counter() - t < 3.0  # > 300/s even on a loaded CPU; ~4000/s typical
    assert data.images.shape == (1000, 64, 64, 3) and data.images.dtype == np.uint8
    ds = ShapesDataset(data, tokenize=toy_tokenize)
    img, tok = ds[0]
    assert img.shape == (3, 64, 64) and 0 <= img.min() and img.max() <= 1 
    assert "blue star" in data.captions[0] and detok(tok) == data.captions[0][:24]
    img2, label = ShapesDataset(data, transform=small_transform, return_label=True)[1]
    assert img2.shape == (3, 8, 8) and label == cfg.class_names().index("blue star")


def test_shapes_kind_train_loader():
    cfg = DataConfig(kind="shapes", num_samples=40, shapes=ShapesConfig(image_size=16))
    loader = build_train_loader(cfg, None, toy_tokenize, batch_size=8, workers=0)
    batches = list(loader)
    assert loader.num_batches == 5 and len(batches) == 5 and batches[0][0].shape == (8, 3, 16, 16)


def test_webdataset_with_two_workers(tmp_path):
    pairs = make_caption_folder(tmp_path, 16)
    res = write_shards(read_caption_file(write_tsv(tmp_path / "c.tsv", pairs)), tmp_path / "s", max_count_per_shard=4)
    cfg = DataConfig(kind="webdataset", train_data=res.url_pattern)
    loader = build_train_loader(cfg, small_transform, toy_tokenize, batch_size=4, workers=2)
    caps = [detok(t) for _, texts in loader for t in texts]
    assert loader.num_batches == 4 and sorted(caps) == sorted(c for _, c in pairs)
    assert loader.stats.seen == 16
