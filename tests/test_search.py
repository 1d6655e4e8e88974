"""``clipforge search`` and :class:`clipforge.retrieval.search.Searcher`: exact results equal brute force.

The collection's embeddings and the reference query embeddings come from open_clip loading the same
weights (``local-dir:``), so the search path (model, tokenizer, preprocessing, index) is checked
against an independent implementation.
"""
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge
from clipforge.checkpoints.openclip_hub import save_openclip_dir
from clipforge.retrieval import index as ix
from clipforge.retrieval.search import Hit, Searcher, search
from conftest import shared_path
from test_index import brute_force, clustered, fp16_unit, unit, write_collection
from train_utils import write_caption_tsv

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from clipforge.config import CLIPConfig

    torch.manual_seed(0)
    model = clipforge.create_model(CLIPConfig.from_dict(TINY))
    path = tmp_path_factory.mktemp("model")
    save_openclip_dir(model, path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """open_clip's (model, preprocess, tokenizer) of the same weights."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{model_dir}")


def open_clip_images(reference, paths):
    from PIL import Image

    model, preprocess, _ = reference
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        return unit(model.encode_image(x).numpy()).astype(np.float32)


def open_clip_texts(reference, texts):
    model, _, tokenizer = reference
    with torch.no_grad():
        return unit(model.encode_text(tokenizer(texts)).numpy()).astype(np.float32)


def embed_with_open_clip(out: Path, reference, model_dir: Path, paths, captions, part_size=10):
    image, text = open_clip_images(reference, paths), open_clip_texts(reference, captions)
    write_collection(out, image, text, part_size=part_size, paths=[str(p) for p in paths], captions=captions,
                     model=f"local-dir:{model_dir}", dtype="float32")
    ix.build_indexes(out, "1G", progress=False)
    return image, text


@pytest.fixture(scope="module")
def collection(tmp_path_factory, reference, model_dir, photos):
    root = tmp_path_factory.mktemp("photos")
    tsv = write_caption_tsv(root, n_images=24, captions_per_image=1)
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    paths, captions = [root / p for p, _ in rows], [f"{c} number {i}" for i, (_, c) in enumerate(rows)]  # no ties
    for i, photo in enumerate(photos):
        paths.append(root / f"photo{i}.png")
        photo.save(paths[-1])
        captions.append(["an astronaut", "a cat", "a cup of coffee", "a rocket"][i])
    out = root / "emb"
    image, text = embed_with_open_clip(out, reference, model_dir, paths, captions)
    return out, image, text, paths, captions


def ids(hits):
    return [h.id for h in hits]


def test_exact_search_equals_brute_force(tmp_path):
    base_image, base_text = clustered(1000, 32, seed=1), clustered(1000, 32, seed=2)
    out = write_collection(tmp_path / "emb", base_image, base_text, part_size=300)
    ix.build_indexes(out, "1G", progress=False)
    s = Searcher(out)
    assert s.modalities == ("image", "text") and s.size("image") == 1000 == s.size("text")
    queries = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    for modality, base in (("image", base_image), ("text", base_text)):
        ref_scores, ref_ids = brute_force(fp16_unit(base), unit(queries), 10)
        for q, r_ids, r_scores in zip(queries, ref_ids, ref_scores):
            hits = s.search_embedding(q * 3.0, k=10, modality=modality)  # any norm: normalised
            assert ids(hits) == r_ids.tolist()
            np.testing.assert_allclose([h.score for h in hits], r_scores, atol=1e-5)
            assert [h.caption for h in hits] == [f"caption {i}" for i in r_ids]
            assert [h.extra["row"] for h in hits] == r_ids.tolist()


def test_text_and_image_queries_match_open_clip(collection, reference):
    from PIL import Image

    out, image, text, paths, captions = collection
    s = Searcher(out)
    for query in ("a red square", "a picture of a stripe in blue", "an astronaut"):
        _, ref = brute_force(image, open_clip_texts(reference, [query]), 8)
        assert ids(s.search_text(query, k=8)) == ref[0].tolist()
        _, ref = brute_force(text, open_clip_texts(reference, [query]), 5)
        assert ids(s.search_text(query, k=5, modality="text")) == ref[0].tolist()
    for p in (paths[1], paths[-1]):
        ref_scores, ref = brute_force(image, open_clip_images(reference, [p]), 6)
        hits = s.search_image(Image.open(p), k=6)
        assert ids(hits) == ref[0].tolist() and hits[0].id == paths.index(p)
        np.testing.assert_allclose([h.score for h in hits], ref_scores[0], atol=1e-4)
    hits = search(out, image=str(paths[2]), k=3)  # the one-shot helper, from a file
    assert hits[0].id == 2 and hits[0].image_path == str(paths[2])


def test_search_id_hit_and_image_file(collection):
    out, image, _, paths, captions = collection
    s = Searcher(out)
    hits = s.search_id(5, k=4)
    assert hits[0].id == 5 and abs(hits[0].score - 1) < 1e-5
    assert ids(hits) == ids(s.search_embedding(image[5], k=4))
    assert ids(s.search_id(5, k=3, modality="text"))[0] == 5
    h = s.hit(7)
    assert (h.id, h.image_path, h.caption, h.extra) == (7, str(paths[7]), captions[7], {"row": 7})
    assert np.isnan(h.score)
    assert s.image_file(7) == paths[7]
    with pytest.raises(IndexError, match="out of range"):
        s.hit(len(paths))
    with pytest.raises(IndexError):
        s.search_id(-1)


def test_image_file_only_for_existing_absolute_files(tmp_path):
    real = tmp_path / "real.jpg"
    real.write_bytes(b"x")
    rows = [str(real), "relative/a.jpg", "https://example.com/a.jpg", "pipe:cat x.tar", str(tmp_path / "gone.jpg")]
    out = write_collection(tmp_path / "emb", clustered(5, 8), paths=rows)
    ix.build_indexes(out, "1G", progress=False)
    s = Searcher(out)
    assert [s.image_file(i) for i in range(5)] == [real, None, None, None, None]


def test_bad_inputs_raise_value_error(collection):
    from PIL import Image

    out, *_ = collection
    s = Searcher(out)
    n = s.size()
    for call, match in [
        (lambda: s.search_text("   "), "empty"),
        (lambda: s.search_text("a cat", k=0), "k must be"),
        (lambda: s.search_text("a cat", k=n + 1), "k must be"),
        (lambda: s.search_embedding(np.ones(7)), "32 numbers"),
        (lambda: s.search_embedding(np.zeros(32)), "not all zero"),
        (lambda: s.search_embedding(np.full(32, np.nan)), "finite"),
        (lambda: s.search_embedding(["a"] * 32), "numbers"),
        (lambda: s.search_text("a cat", modality="audio"), "unknown modality"),
        (lambda: s.search_image("not an image"), "PIL image"),
        (lambda: s.search_id("3"), "integer"),
        (lambda: search(out), "exactly one"),
        (lambda: search(out, text="a", image=Image.new("RGB", (8, 8))), "exactly one"),
        (lambda: search(out, image=b"not an image"), "image"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_model_is_loaded_lazily_and_checked(tmp_path):
    out = write_collection(tmp_path / "emb", clustered(50, 16), model="no-such-model")
    ix.build_indexes(out, "1G", progress=False)
    s = Searcher(out)  # no model needed for embeddings, ids and metadata
    assert s._model is None and len(s.search_embedding(np.ones(16), k=3)) == 3
    with pytest.raises(ValueError, match="unknown model"):
        s.search_text("a cat")


def test_model_dimension_mismatch_is_a_clear_error(tmp_path, model_dir):
    out = write_collection(tmp_path / "emb", clustered(50, 16), model=f"local-dir:{model_dir}")
    ix.build_indexes(out, "1G", progress=False)
    with pytest.raises(ValueError, match="32-d embeddings but the image index holds 16-d"):
        Searcher(out).search_text("a cat")


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_indexes_are_memory_mapped_and_stale_parts_ignored(tmp_path, factory):
    base = clustered(400, 16, seed=3)
    out = write_collection(tmp_path / "emb", base, part_size=100)
    ix.build_indexes(out, "1G", factory=factory, recall_queries=50, progress=False)
    extra = write_collection(tmp_path / "more", clustered(500, 16, seed=4), part_size=100)  # embed goes on ...
    for sub in ("img_emb/img_emb_00004.npy", "metadata/metadata_00004.parquet"):
        (out / sub).write_bytes((extra / sub).read_bytes())
    s = Searcher(out)
    assert ix.is_memory_mapped(s.indexes["image"]) and s.size() == 400 and s.metadata.num_rows == 400
    assert not ix.is_memory_mapped(Searcher(out, mmap=False).indexes["image"])
    assert ids(s.search_id(123, k=1)) == [123]


def test_concurrent_queries_agree(collection):
    out, *_ = collection
    s = Searcher(out)
    queries = ["a red square", "a cat", "a blue stripe", "a rocket"] * 3
    expected = [ids(s.search_text(q, k=5)) for q in queries]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda q: ids(s.search_text(q, k=5)), queries)) == expected


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "clipforge", "search", *map(str, args)], capture_output=True,
                          text=True, timeout=180)


def test_cli_search(collection, capsys):
    from clipforge.cli import main

    out, _, _, paths, _ = collection
    s = Searcher(out)
    proc = run_cli(out, "a red square", "-k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in rows] == ids(s.search_text("a red square", k=3))
    assert set(rows[0]) == {"id", "score", "image_path", "caption", "extra"}
    assert main(["search", str(out), "--image", str(paths[4]), "--k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[2] == "#4" and str(paths[4]) in lines[0]
    assert main(["search", str(out), "a cat", "--top-k", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    for args, message in (((out,), "give a text query or --image"), ((out, ""), "empty"),
                          ((out, "a cat", "-k", "0"), "k must be"), ((out, "--image", out / "nope.jpg"), "nope.jpg")):
        assert main(["search", *map(str, args)]) == 2
        assert message in capsys.readouterr().err, args


def test_coco_mini_exact_search_equals_brute_force(tmp_path, reference, model_dir):
    folder = shared_path("data", "coco-mini")
    from clipforge.data.captions import read_caption_file

    records = read_caption_file(folder / "captions_val2017.json")
    firsts = {}
    for r in records:
        firsts.setdefault(r.path, r.caption)
    paths, captions = list(firsts)[:48], list(firsts.values())[:48]
    image, text = embed_with_open_clip(tmp_path / "emb", reference, model_dir, paths, captions, part_size=20)
    s = Searcher(tmp_path / "emb")
    for query in captions[:4]:
        _, ref = brute_force(image, open_clip_texts(reference, [query]), 10)
        assert ids(s.search_text(query, k=10)) == ref[0].tolist()
    assert isinstance(s.hit(0), Hit) and s.image_file(0) == Path(paths[0])


def test_embed_index_search_end_to_end(tmp_path, reference, model_dir, photos):
    """The folder `clipforge embed` writes, indexed and searched: hits equal brute force on open_clip's vectors."""
    embed = pytest.importorskip("clipforge.retrieval.embed").embed
    root = tmp_path / "photos"
    write_caption_tsv(root, n_images=8, captions_per_image=1)
    for i, photo in enumerate(photos):
        photo.save(root / "images" / f"photo{i}.png")
    embed(root / "images", tmp_path / "emb", f"local-dir:{model_dir}", part_size=5, workers=0, dtype="float32",
          progress=False)
    ix.build_indexes(tmp_path / "emb", "1G", progress=False)
    s = Searcher(tmp_path / "emb")
    paths = [Path(s.hit(i).image_path) for i in range(s.size())]
    assert sorted(p.name for p in paths) == sorted([f"{i:03d}.jpg" for i in range(8)] +
                                                   [f"photo{i}.png" for i in range(4)])
    image = open_clip_images(reference, paths)
    for query in ("a green stripe", "an astronaut"):
        _, ref = brute_force(image, open_clip_texts(reference, [query]), 5)
        assert ids(s.search_text(query, k=5)) == ref[0].tolist()
    assert s.image_file(0) == paths[0]
