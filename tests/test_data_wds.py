import io
import json
import tarfile
from collections import Counter

import pytest

from clipforge.data import (DataConfig, DataError, WdsCaptionStream, build_eval_loader, build_train_loader,
                            expand_urls, read_caption_file, read_shard_sizes, write_shards)
from test_data_common import detok, make_caption_folder, small_transform, toy_tokenize, write_tsv


def _shards(tmp_path, n=10, per_shard=4, name="src", prefix="shard"):
    root = tmp_path / name
    pairs = make_caption_folder(root, n)
    pairs = [(p, f"{name} {c}") for p, c in pairs]
    tsv = write_tsv(root / "caps.tsv", pairs)
    res = write_shards(read_caption_file(tsv), root / "shards", max_count_per_shard=per_shard, prefix=prefix)
    return root, pairs, res


def _captions(batches):
    return [detok(t) for b in batches for t in b.texts]


def test_write_shards_round_trip(tmp_path):
    root, pairs, res = _shards(tmp_path)
    assert [p.name for p in res.shard_paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    sizes = json.loads((root / "shards" / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 4, "shard-000001.tar": 4, "shard-000002.tar": 2}
    with tarfile.open(res.shard_paths[0]) as t:  # original bytes, zero-padded keys
        assert t.getnames()[:2] == ["000000000.jpg", "000000000.txt"]
        assert t.extractfile("000000000.jpg").read() == (root / pairs[0][0]).read_bytes()
    urls, _ = expand_urls(res.url_pattern)
    assert urls == [str(p) for p in res.shard_paths] and read_shard_sizes(urls) == 10
    cfg = DataConfig(kind="webdataset", train_data=res.url_pattern)
    loader = build_eval_loader(cfg, small_transform, toy_tokenize, batch_size=3)
    caps = [detok(t) for _, texts in loader for t in texts]
    assert caps == [c for _, c in pairs] and loader.stats.seen == 10 and loader.stats.skipped == 0


def test_write_shards_skips_missing_and_empty(tmp_path):
    pairs = make_caption_folder(tmp_path, 2)
    res = write_shards([(tmp_path / pairs[0][0], "ok"), (tmp_path / "nope.jpg", "x"),
                        (tmp_path / pairs[1][0], " ")], tmp_path / "out")
    assert res.n_written == 1 and len(res.skipped) == 2 and "FileNotFound" in res.skipped[0].reason


def test_epoch_mode_counts_and_reshuffle(tmp_path):
    _, pairs, res = _shards(tmp_path, n=12, per_shard=3)
    cfg = DataConfig(kind="webdataset", train_data=res.url_pattern, shuffle_buffer=8)
    loader = build_train_loader(cfg, small_transform, toy_tokenize, batch_size=4, workers=0, seed=1)
    assert loader.num_batches == 3 and loader.num_samples == 12
    e0 = [detok(t) for _, texts in loader for t in texts]
    assert sorted(e0) == sorted(c for _, c in pairs)  # one epoch covers the data once
    again = [detok(t) for _, texts in loader for t in texts]
    loader.set_epoch(1)
    e1 = [detok(t) for _, texts in loader for t in texts]
    assert again == e0 and e1 != e0 and sorted(e1) == sorted(e0)
    loader.set_epoch(1, start_batch=2)
    assert len(list(loader)) == 1


def test_resampled_mode_counts(tmp_path):
    _, _, res = _shards(tmp_path, n=6, per_shard=2)
    cfg = DataConfig(kind="webdataset", train_data=res.url_pattern, resampled=True, num_samples=20)
    loader = build_train_loader(cfg, small_transform, toy_tokenize, batch_size=4, workers=0)
    batches = list(loader)
    assert loader.num_batches == 5 and len(batches) == 5 and all(len(t) == 4 for _, t in batches)


def test_split_by_rank_disjoint(tmp_path):
    _, pairs, res = _shards(tmp_path, n=16, per_shard=2)
    urls, _ = expand_urls(res.url_pattern)
    seen = []
    for rank in range(2):
        s = WdsCaptionStream(urls, small_transform, toy_tokenize, 3, rank=rank, world_size=2, seed=5)
        seen.append(set(_captions(s)))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == {c for _, c in pairs}
    assert len(seen[0]) == len(seen[1]) == 8


def test_mixing_with_weights_and_pipe(tmp_path):
    _, _, ra = _shards(tmp_path, n=8, per_shard=2, name="A")
    _, _, rb = _shards(tmp_path, n=8, per_shard=2, name="B")
    spec = f"{ra.url_pattern}::pipe:cat {rb.url_pattern}"
    urls, weights = expand_urls(spec, "1::3")
    assert len(urls) == 8 and weights == [1.0] * 4 + [3.0] * 4 and urls[4].startswith("pipe:cat ")
    cfg = DataConfig(kind="webdataset", train_data=spec, resampled=True, upsampling_factors="1::3",
                     num_samples=400, shuffle_buffer=1)
    loader = build_train_loader(cfg, small_transform, toy_tokenize, batch_size=20, workers=0)
    src = Counter(detok(t)[0] for _, texts in loader for t in texts)
    assert sum(src.values()) == 400 and 0.65 < src["B"] / 400 < 0.85
    assert read_shard_sizes(urls) is None  # pipe: sources have no known size
    with pytest.raises(ValueError, match="resampled"):
        build_train_loader(DataConfig(kind="webdataset", train_data=spec, upsampling_factors="1::3",
                                      num_samples=10), small_transform, toy_tokenize, 4, workers=0)


def _add(t, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def test_broken_samples_in_shards_counted(tmp_path):
    root, pairs, res = _shards(tmp_path, n=4, per_shard=4)
    good = (root / pairs[0][0]).read_bytes()
    bad = root / "shards" / "bad.tar"
    with tarfile.open(bad, "w") as t:
        _add(t, "k1.jpg", good[: len(good) // 2]); _add(t, "k1.txt", b"truncated")
        _add(t, "k2.jpg", good); _add(t, "k2.txt", b"  ")
        _add(t, "k3.txt", b"no image")
        _add(t, "k4.png", good); _add(t, "k4.txt", b"wrong ext ok")
    cut = root / "shards" / "cut.tar"  # a tar cut short mid-member
    cut.write_bytes(res.shard_paths[0].read_bytes()[:2000])
    urls = [str(res.shard_paths[0]), str(bad), str(cut), str(root / "shards" / "absent.tar")]
    s = WdsCaptionStream(urls, small_transform, toy_tokenize, batch_size=100, shuffle=False)
    (batch,) = list(s)
    caps = _captions([batch])
    assert caps[:4] == [c for _, c in pairs] and "wrong ext ok" in caps
    reasons = " | ".join(f"{b.path} {b.reason}" for b in batch.skipped)
    for needle in ("bad.tar#k1", "EmptyCaption", "MissingImage", "absent.tar", "cut.tar"):
        assert needle in reasons, reasons


def test_all_broken_stream_raises(tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as t:
        for i in range(5):
            _add(t, f"k{i}.jpg", b"junk"); _add(t, f"k{i}.txt", b"x")
    cfg = DataConfig(kind="webdataset", train_data=str(bad), resampled=True, num_samples=100, min_seen=10)
    loader = build_train_loader(cfg, small_transform, toy_tokenize, batch_size=4, workers=0)
    with pytest.raises(DataError):
        list(loader)


def test_needs_size_or_sizes_json(tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        build_train_loader(DataConfig(kind="webdataset", train_data="pipe:cat x.tar"),
                           small_transform, toy_tokenize, 4, workers=0)


def test_info_json_sizes_and_too_few_shards(tmp_path):
    _, _, res = _shards(tmp_path, n=6, per_shard=3)
    d = res.shard_paths[0].parent
    sizes = json.loads((d / "sizes.json").read_text())
    (d / "sizes.json").unlink()
    urls, _ = expand_urls(res.url_pattern)
    assert read_shard_sizes(urls) is None
    (d / "_info.json").write_text(json.dumps({"sizes": sizes}))
    assert read_shard_sizes(urls) == 6
    cfg = DataConfig(kind="webdataset", train_data=res.url_pattern)
    with pytest.raises(ValueError, match="2 shards < 2 ranks x 2 workers"):
        build_train_loader(cfg, small_transform, toy_tokenize, 2, world_size=2, workers=2)
