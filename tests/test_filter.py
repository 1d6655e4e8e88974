"""``clipforge filter``: kept pairs equal a brute-force reference built on open_clip's embeddings."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipforge.data.captions import read_caption_file
from clipforge.retrieval.filter import filter_pairs, near_duplicates
from test_search import model_dir, open_clip_images, open_clip_texts, reference  # noqa: F401 (fixtures)
from train_utils import write_caption_tsv


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A TSV with an extra column, an exact duplicate image, a broken image and an empty caption."""
    root = tmp_path_factory.mktemp("pairs")
    tsv = write_caption_tsv(root, n_images=12, captions_per_image=2)
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    shutil.copy(root / "images/003.jpg", root / "images/dup.jpg")
    (root / "images/broken.jpg").write_bytes(b"not a jpeg")
    rows += [["images/dup.jpg", rows[6][1]], ["images/broken.jpg", "a broken file"], ["images/005.jpg", ""]]
    lines = ["filepath\ttitle\tid"] + [f"{p}\t{c}\tr{i}" for i, (p, c) in enumerate(rows)]
    path = root / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_scores(reference, records):
    """Cosine of open_clip's image and caption embeddings per record; nan where unreadable or empty."""
    from PIL import UnidentifiedImageError

    scores, feats = [], {}
    for r in records:
        if r.path not in feats:
            try:
                feats[r.path] = open_clip_images(reference, [r.path])[0]
            except UnidentifiedImageError:
                feats[r.path] = None
        ok = feats[r.path] is not None and r.caption.strip()
        scores.append(float(feats[r.path] @ open_clip_texts(reference, [r.caption])[0]) if ok else np.nan)
    return np.array(scores), feats


def reference_keep(records, scores, feats, threshold, dedup):
    """Brute force: score >= threshold, then the greedy first-of-group walk over kept images in order."""
    keep = ~np.isnan(scores) & (np.nan_to_num(scores, nan=-2) >= threshold)
    images = list(dict.fromkeys(r.path for r, k in zip(records, keep) if k))
    dropped = set()
    for i, a in enumerate(images):
        if a in dropped:
            continue
        for b in images[i + 1:]:
            if b not in dropped and float(feats[a] @ feats[b]) > dedup:
                dropped.add(b)
    return [i for i, (r, k) in enumerate(zip(records, keep)) if k and r.path not in dropped], dropped


def midpoint_threshold(scores):
    """A threshold halfway between two neighbouring scores near the median (never on a score)."""
    s = np.sort(scores[~np.isnan(scores)])
    i = len(s) // 2
    return float((s[i - 1] + s[i]) / 2)


@pytest.mark.parametrize("dedup", [0.999, 0.99])
def test_filter_keeps_exactly_the_pairs_above_threshold(pairs, reference, model_dir, tmp_path, dedup):
    records = read_caption_file(pairs)
    scores, feats = reference_scores(reference, records)
    threshold = midpoint_threshold(scores)
    expected, dup_images = reference_keep(records, scores, feats, threshold, dedup)
    out = tmp_path / "out" / "kept.tsv"  # another folder: relative paths must be re-based
    r = filter_pairs(pairs, out, f"local-dir:{model_dir}", threshold=threshold, dedup=dedup, progress=False)
    kept = read_caption_file(out)
    assert [(k.path.resolve(), k.caption) for k in kept] == [(records[i].path.resolve(), records[i].caption)
                                                             for i in expected]
    ids = [line.split("\t")[2] for line in out.read_text().splitlines()[1:]]
    assert ids == [f"r{i}" for i in expected]  # other columns kept
    assert (r.pairs, r.images, r.broken, r.kept) == (len(records), 14, 2, len(expected))
    assert r.duplicate_images == len(dup_images)
    assert r.dropped_score + r.dropped_duplicate + r.broken + r.kept == r.pairs
    report = json.loads(Path(r.report).read_text())
    assert report["kept"] == r.kept and report["threshold"] == threshold and sum(report["score"]["histogram"]["counts"]) == len(records) - 2
    assert Path(r.histogram).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {e["image"].split("/")[-1] for e in report["broken_examples"] if "image" in e} == {"broken.jpg"}


def test_filter_drops_a_duplicated_image(pairs, model_dir, tmp_path):
    r = filter_pairs(pairs, tmp_path / "all.tsv", f"local-dir:{model_dir}", top_fraction=1.0, dedup=0.999,
                     progress=False)
    kept_paths = [k.path.name for k in read_caption_file(tmp_path / "all.tsv")]
    assert "dup.jpg" not in kept_paths and "broken.jpg" not in kept_paths and r.dropped_duplicate >= 1
    assert any(e["dropped"].endswith("dup.jpg") for e in r.duplicate_examples)
    assert r.dropped_score == 0 and r.kept == r.pairs - r.broken - r.dropped_duplicate
    r_none = filter_pairs(pairs, tmp_path / "nodedup.tsv", f"local-dir:{model_dir}", top_fraction=1.0, dedup=None,
                          progress=False)
    assert r_none.kept == r_none.pairs - 2 and r_none.dropped_duplicate == 0


def test_top_fraction_jsonl_and_coco_keep_their_format(pairs, reference, model_dir, tmp_path):
    records = [r for r in read_caption_file(pairs) if r.caption.strip() and r.path.name != "broken.jpg"]
    scores, _ = reference_scores(reference, records)
    root = pairs.parent
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"image": str(r.path.relative_to(root)), "caption": r.caption, "n": i}) + "\n"
                             for i, r in enumerate(records)))
    r = filter_pairs(jsonl, tmp_path / "top.jsonl", f"local-dir:{model_dir}", top_fraction=0.25, dedup=None,
                     progress=False)
    best = np.argsort(-scores, kind="stable")[:int(np.ceil(0.25 * len(records)))]
    lines = [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()]
    assert [o["n"] for o in lines] == sorted(best.tolist())
    assert r.threshold == pytest.approx(scores[best].min(), abs=1e-4)
    assert [k.path.resolve() for k in read_caption_file(tmp_path / "top.jsonl")] == \
        [records[i].path.resolve() for i in sorted(best)]
    files = sorted({r.path.name for r in records})
    coco = {"info": {"v": 1}, "images": [{"id": i, "file_name": f"images/{f}"} for i, f in enumerate(files)],
            "annotations": [{"id": j, "image_id": files.index(r.path.name), "caption": r.caption}
                            for j, r in enumerate(records)]}
    (root / "coco.json").write_text(json.dumps(coco))
    filter_pairs(root / "coco.json", tmp_path / "coco_top.json", f"local-dir:{model_dir}", top_fraction=0.25,
                 dedup=None, progress=False)
    out = json.loads((tmp_path / "coco_top.json").read_text())
    assert out["info"] == {"v": 1} and [a["id"] for a in out["annotations"]] == sorted(best.tolist())
    assert {im["id"] for im in out["images"]} == {a["image_id"] for a in out["annotations"]}
    assert [k.path.resolve() for k in read_caption_file(tmp_path / "coco_top.json")] == \
        [records[i].path.resolve() for i in sorted(best)]


def test_near_duplicates_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x[50:60] = x[10] + 0.01 * rng.standard_normal((10, 16))  # a group of near-copies of row 10
    x[200] = x[5]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dropped, by, factory = near_duplicates(x, 0.95)
    sims = x @ x.T
    ref = np.zeros(300, dtype=bool)
    for i in range(300):
        if not ref[i]:
            ref[i + 1:] |= sims[i, i + 1:] > 0.95
    assert factory == "Flat" and np.array_equal(dropped, ref)
    assert dropped[50:60].all() and dropped[200] and by[200][0] == 5 and not dropped[[5, 10]].any()


def test_bad_inputs(pairs, model_dir, tmp_path):
    m = f"local-dir:{model_dir}"
    with pytest.raises(ValueError, match="not both"):
        filter_pairs(pairs, tmp_path / "o.tsv", m, threshold=0.2, top_fraction=0.5)
    with pytest.raises(ValueError, match="top fraction"):
        filter_pairs(pairs, tmp_path / "o.tsv", m, top_fraction=0.0)
    with pytest.raises(ValueError, match="dedup"):
        filter_pairs(pairs, tmp_path / "o.tsv", m, dedup=1.5)
    with pytest.raises(ValueError, match="overwrite the input"):
        filter_pairs(pairs, pairs, m)
    with pytest.raises(FileNotFoundError, match="no such caption file"):
        filter_pairs(tmp_path / "missing.tsv", tmp_path / "o.tsv", m)
    assert not (tmp_path / "o.tsv").exists()


def test_cli_filter(pairs, model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clipforge", "filter", str(pairs), str(tmp_path / "kept.tsv"),
                           "--model", f"local-dir:{model_dir}", "--top-fraction", "0.5", "--dedup", "0.999",
                           "--no-progress"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("kept ") and "of 27 pairs (14 images)" in proc.stdout
    assert (tmp_path / "kept.report.json").is_file() and (tmp_path / "kept.scores.png").is_file()


def _tar(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _tar_samples(path):
    """(key, {ext: bytes}) of a tar in member order, read with tarfile (not webdataset)."""
    import tarfile

    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(samples.items())


@pytest.fixture(scope="module")
def shard_set(pairs):
    """Three shards of generated images (one an exact copy of another), and a hand-made tar with a
    broken image, an image without caption, one with an empty caption and one good sample."""
    from clipforge.data.shards import write_shards

    root = pairs.parent
    records = [r for r in read_caption_file(pairs) if r.caption.strip() and r.path.name != "broken.jpg"][::2]
    records.append(records[3]._replace(caption="another view of the same picture"))  # same image bytes again
    res = write_shards(records, root / "shards", max_count_per_shard=5)
    assert len(res.shard_paths) == 3
    good = (root / "images/007.jpg").read_bytes()
    _tar(root / "extra.tar", [("a.jpg", b"not a jpeg"), ("a.txt", b"a broken file"), ("b.jpg", good),
                              ("c.jpg", good), ("c.txt", b"  "), ("d.jpg", (root / "images/010.jpg").read_bytes()),
                              ("d.txt", b"a blue square")])
    return f"{root}/shards/shard-{{000000..000002}}.tar::{root}/extra.tar", [*res.shard_paths, root / "extra.tar"]


@pytest.mark.parametrize("cut", ["threshold", "top_fraction"])
def test_filter_shards_keeps_exactly_the_reference_samples(shard_set, reference, model_dir, tmp_path, cut):
    import io

    from PIL import UnidentifiedImageError

    spec, tars = shard_set
    samples = [((str(t), k), m) for t in tars for k, m in _tar_samples(t)]
    pairs_ = [(sid, m) for sid, m in samples if "txt" in m]  # a sample without caption is no pair
    scores, feats, records = [], {}, []
    for sid, m in pairs_:
        caption = m["txt"].decode()
        try:
            feats[sid] = open_clip_images(reference, [io.BytesIO(m["jpg"])])[0]
        except UnidentifiedImageError:
            feats[sid] = None
        ok = feats[sid] is not None and caption.strip()
        scores.append(float(feats[sid] @ open_clip_texts(reference, [caption])[0]) if ok else np.nan)
        records.append(type("R", (), {"path": sid, "caption": caption})())
    scores = np.array(scores)
    if cut == "threshold":
        threshold = midpoint_threshold(scores)
        dedup, kwargs = 0.99, {"threshold": threshold}
    else:
        threshold, dedup, kwargs = -1.0, 0.999, {"top_fraction": 1.0}
    expected, dup_images = reference_keep(records, scores, feats, threshold, dedup)
    out = tmp_path / "kept"
    r = filter_pairs(spec, out, f"local-dir:{model_dir}", dedup=dedup, shard_size=3, progress=False, **kwargs)
    written = [m for p in sorted(out.glob("*.tar")) for _, m in _tar_samples(p)]
    assert [(m["jpg"], m["txt"].decode()) for m in written] == \
        [(pairs_[i][1]["jpg"], pairs_[i][1]["txt"].decode()) for i in expected]
    assert all(len(_tar_samples(p)) <= 3 for p in out.glob("*.tar"))
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == len(expected) == r.kept
    assert (r.pairs, r.broken, r.images) == (len(samples), 3, len(samples) - 2)
    assert r.duplicate_images == len(dup_images)
    assert r.dropped_score + r.dropped_duplicate + r.broken + r.kept == r.pairs
    if cut == "top_fraction":
        copy = f"{tars[2]}#{samples[len(samples) - 5][0][1]}"  # the last shard sample: the copied image
        assert r.dropped_score == 0 and r.dropped_duplicate >= 1
        assert copy in {e["dropped"] for e in r.duplicate_examples}
    report = json.loads(Path(r.report).read_text())
    assert Path(r.report).parent == tmp_path and report["kept"] == r.kept
    assert {e["source"].split("#")[-1] for e in report["broken_examples"]} >= {"c"}  # the empty caption
    assert any("MissingCaption" in e["reason"] for e in report["broken_examples"])


def test_filter_shards_bad_inputs(shard_set, model_dir, tmp_path):
    spec, tars = shard_set
    m = f"local-dir:{model_dir}"
    with pytest.raises(ValueError, match="overwrite the input shard"):
        filter_pairs(spec, tars[0].parent, m)
    with pytest.raises(FileNotFoundError, match="no such shard"):
        filter_pairs(str(tmp_path / "missing-{0..1}.tar"), tmp_path / "o", m)
    assert not (tmp_path / "o").exists()


def test_cli_filter_shards(shard_set, model_dir, tmp_path, capsys):
    from clipforge.cli import main as cli

    spec, tars = shard_set
    m = f"local-dir:{model_dir}"
    assert cli(["filter", spec, str(tars[0].parent), "--model", m, "--no-progress"]) == 2
    assert "overwrite the input shard" in capsys.readouterr().err
    assert cli(["filter", spec, str(tmp_path / "kept"), "--model", m, "--top-fraction", "0.5", "--shard-size", "2",
                "--no-progress"]) == 0
    samples = sum(len(_tar_samples(t)) for t in tars)
    assert f"of {samples} pairs" in capsys.readouterr().out
    sizes = json.loads((tmp_path / "kept" / "sizes.json").read_text())
    assert sizes and max(sizes.values()) <= 2 and (tmp_path / "kept.scores.png").is_file()
