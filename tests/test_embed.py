"""``clipforge embed``: written embeddings against open_clip's own encode_image/encode_text on the same files,
metadata rows against npy rows, every input kind, broken inputs, SIGKILL + resume, refused settings, torchrun."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipforge.checkpoints.openclip_hub import save_openclip_dir
from clipforge.cli import main as cli_main
from clipforge.config import CLIPConfig
from clipforge.models.clip import CLIP
from clipforge.retrieval import layout
from clipforge.retrieval.embed import assign_parts, detect_input_kind, embed
from train_utils import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
FP16_TOL, FP32_TOL = 1e-3, 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A seeded tiny CLIP in OpenCLIP's hub layout: clipforge and open_clip both load it (``local-dir:``)."""
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_openclip_dir(CLIP(CLIPConfig.from_dict(TINY_MODEL)).eval(), path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """open_clip's model, eval preprocessing and tokenizer for the same directory: the independent reference."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{model_dir}")


def ref_images(reference, paths):
    model, preprocess, _ = reference
    with torch.no_grad():
        feats = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]))
    return torch.nn.functional.normalize(feats, dim=-1).numpy()


def ref_texts(reference, captions):
    model, _, tokenizer = reference
    with torch.no_grad():
        feats = model.encode_text(tokenizer(captions))
    return torch.nn.functional.normalize(feats, dim=-1).numpy()


def write_images(root: Path, n: int, seed: int = 0, size=(40, 48)) -> list:
    """``n`` noise images (JPEG, PNG, greyscale PNG) in nested folders; returns their paths, sorted."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = root / f"d{i % 3}" / ("deep" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        if i % 4 == 1:
            path = folder / f"img{i:03d}.png"
            Image.fromarray(pixels).save(path)
        elif i % 4 == 2:
            path = folder / f"img{i:03d}.png"
            Image.fromarray(pixels[..., 0]).save(path)  # mode L
        else:
            path = folder / f"img{i:03d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """14 good images, one broken ``.jpg`` (listed as failed) and a non-image file (ignored)."""
    root = tmp_path_factory.mktemp("photos")
    good = write_images(root, 14)
    (root / "d1" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.md").write_text("not an image")
    order = sorted([*good, root / "d1" / "broken.jpg"], key=lambda p: p.relative_to(root).as_posix())
    return root, good, order


def read_folder(out: Path, modality: str = "image"):
    """(embeddings of every part, metadata table rows as dicts), concatenated in part order."""
    parts = layout.complete_parts(out)
    rows = []
    for p in parts:
        table = pq.read_table(layout.metadata_path(out, p)).to_pylist()
        emb = np.load(layout.embedding_path(out, modality, p))
        assert emb.shape[0] == len(table), f"part {p}: {emb.shape[0]} embedding rows, {len(table)} metadata rows"
        rows += table
    return layout.load_embeddings(out, modality), rows


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def embed_tiny(input, out, model_dir, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    kw.setdefault("progress", False)
    return embed(input, out, f"local-dir:{model_dir}", **kw)


# ---- image folders ----------------------------------------------------------------------------------
def test_folder_embeddings_equal_open_clip(folder, model_dir, reference, tmp_path):
    root, good, order = folder
    res = embed_tiny(root, tmp_path / "out", model_dir, part_size=4, workers=2)
    out = tmp_path / "out"
    assert res.complete and res.rows == 14 and res.failed == 1 and res.parts == 4  # 15 inputs / 4 per part
    emb, rows = read_folder(out)
    assert emb.dtype == np.float32 and np.load(layout.embedding_path(out, "image", 0)).dtype == np.float16
    assert [r["image_path"] for r in rows] == [str(p) for p in good]  # sorted walk, broken one left out
    err = max_err(emb, ref_images(reference, good))
    print(f"\nMAXDIFF embed fp16 vs open_clip encode_image: {err:.2e}")
    assert err <= FP16_TOL
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    # part N holds inputs 4N..4N+3 of the walk, minus the broken one
    for p in range(4):
        meta = pq.read_table(layout.metadata_path(out, p)).column("image_path").to_pylist()
        assert meta == [str(q) for q in order[4 * p:4 * p + 4] if q.name != "broken.jpg"]
    offsets = layout.part_offsets(out, "image")  # global row ids: part order, then row
    assert [o[0] for o in offsets] == [0, 1, 2, 3] and offsets[-1][1] + offsets[-1][2] == 14
    assert all(a[1] + a[2] == b[1] for a, b in zip(offsets, offsets[1:]))
    failed = layout.read_failed(out)
    assert len(failed) == 1 and failed[0]["source"] == str(root / "d1" / "broken.jpg")
    assert failed[0]["reason"].startswith("UnidentifiedImageError") and failed[0]["part"] == order.index(
        root / "d1" / "broken.jpg") // 4
    info = layout.read_info(out)
    assert (info.rows, info.failed, info.complete, info.dim, info.modalities) == (14, 1, True, 32, ["image"])
    assert not list(out.rglob("*.tmp"))

    res32 = embed_tiny(root, tmp_path / "out32", model_dir, part_size=100, dtype="float32")
    emb32, _ = read_folder(tmp_path / "out32")
    assert res32.parts == 1 and np.load(layout.embedding_path(tmp_path / "out32", "image", 0)).dtype == np.float32
    assert max_err(emb32, ref_images(reference, good)) <= FP32_TOL


def test_one_part_in_memory_at_a_time(folder, model_dir, tmp_path, monkeypatch):
    """Streaming: a part's buffer is written and dropped before the next one starts (memory flat in N)."""
    from clipforge.retrieval import embed as embed_module

    root, good, _ = folder
    open_now, peak, sizes = [0], [0], []
    init, flush = embed_module._PartBuffer.__init__, embed_module._flush

    def counting_init(self, part):
        init(self, part)
        open_now[0] += 1
        peak[0] = max(peak[0], open_now[0])

    def counting_flush(out, buf, *args):
        sizes.append(len(buf.rows))
        flush(out, buf, *args)
        open_now[0] -= 1

    monkeypatch.setattr(embed_module._PartBuffer, "__init__", counting_init)
    monkeypatch.setattr(embed_module, "_flush", counting_flush)
    res = embed_tiny(root, tmp_path / "out", model_dir, part_size=3, workers=2, batch_size=2)
    assert res.parts == 5 and peak[0] == 1 and open_now[0] == 0 and max(sizes) <= 3 and sum(sizes) == 14


def test_folder_sidecar_captions_and_fast_paths(model_dir, reference, tmp_path):
    root = tmp_path / "photos"
    paths = write_images(root, 6, seed=1, size=(150, 180))
    captions = [f"photo number {i} of a noisy square" for i in range(6)]
    for p, c in zip(paths, captions):
        p.with_suffix(".txt").write_text(c + "\n")
    res = embed_tiny(root, tmp_path / "out", model_dir, part_size=4, dtype="float32")
    assert res.modalities == ("image", "text")
    img, rows = read_folder(tmp_path / "out")
    txt, _ = read_folder(tmp_path / "out", "text")
    assert [r["caption"] for r in rows] == captions
    assert max_err(img, ref_images(reference, paths)) <= FP32_TOL
    assert max_err(txt, ref_texts(reference, captions)) <= FP32_TOL
    only_text = embed_tiny(root, tmp_path / "text", model_dir, part_size=4, dtype="float32", modalities=["text"])
    assert only_text.modalities == ("text",) and not (tmp_path / "text" / "img_emb").exists()
    assert max_err(read_folder(tmp_path / "text", "text")[0], txt) <= FP32_TOL
    for mode in ({"precision": "bf16"}, {"int8": True}, {"draft": True}):
        embed_tiny(root, tmp_path / "fast", model_dir, part_size=4, overwrite=True, **mode)
        fast_img, _ = read_folder(tmp_path / "fast")
        fast_txt, _ = read_folder(tmp_path / "fast", "text")
        cos = min((fast_img * img).sum(1).min(), (fast_txt * txt).sum(1).min())
        print(f"\nmin cosine {mode} vs fp32: {cos:.4f}")
        info = layout.read_info(tmp_path / "fast").to_dict()
        assert cos >= 0.99 and {**info, **info["extra"]}.items() >= mode.items()
        if "draft" in mode:  # JPEGs decoded at 1/2 scale: close, not equal
            assert max_err(fast_img, img) > 1e-6


# ---- caption files, text files, shards ---------------------------------------------------------------
@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioned")
    paths = write_images(root / "images", 5, seed=2)
    captions = ["a red square", "two dogs, playing", "a cup of coffee", 'a "quoted" caption', "a rocket"]
    return root, paths, captions


@pytest.mark.parametrize("kind", ["tsv", "csv", "jsonl", "coco"])
def test_caption_files(kind, captioned, model_dir, reference, tmp_path):
    root, paths, captions = captioned
    rel = [p.relative_to(root).as_posix() for p in paths]
    expect_extra = {}
    if kind == "tsv":
        file = root / "pairs.tsv"
        file.write_text("filepath\ttitle\tlicense\n" + "".join(f"{r}\t{c}\tcc-by-{i}\n"
                                                                for i, (r, c) in enumerate(zip(rel, captions))))
        expect_extra = {"license": [f"cc-by-{i}" for i in range(5)]}
    elif kind == "csv":
        file = root / "pairs.csv"
        esc = [c.replace('"', '""') for c in captions]
        file.write_text("url,text,width\n" + "".join(f'{r},"{c}",{40 + i}\n' for i, (r, c) in enumerate(zip(rel, esc))))
        expect_extra = {"width": [str(40 + i) for i in range(5)]}
    elif kind == "jsonl":
        file = root / "pairs.jsonl"
        file.write_text("".join(json.dumps({"image": r, "caption": c, "id": i, "tags": ["x"]}) + "\n"
                                for i, (r, c) in enumerate(zip(rel, captions))))
        expect_extra = {"id": list(range(5)), "tags": ['["x"]'] * 5}
        mixed = root / "mixed.jsonl"  # a field whose type varies is kept as strings
        mixed.write_text("".join(json.dumps({"image": r, "caption": c, "note": i if i % 2 else f"n{i}"}) + "\n"
                                 for i, (r, c) in enumerate(zip(rel, captions))))
        embed_tiny(mixed, tmp_path / "mixed", model_dir, part_size=2)
        assert [r["note"] for r in read_folder(tmp_path / "mixed")[1]] == ["n0", "1", "n2", "3", "n4"]
    else:
        file = root / "captions.json"
        file.write_text(json.dumps({"images": [{"id": 10 + i, "file_name": r} for i, r in enumerate(rel)],
                                    "annotations": [{"image_id": 10 + i, "id": 100 + i, "caption": c}
                                                    for i, c in enumerate(captions)]}))
        expect_extra = {"image_id": [10 + i for i in range(5)], "annotation_id": [100 + i for i in range(5)]}
    keys = {"img_key": "url", "caption_key": "text"} if kind == "csv" else {}
    out = tmp_path / "out"
    res = embed_tiny(file, out, model_dir, part_size=2, **keys)
    assert res.complete and res.rows == 5 and res.parts == 3 and layout.read_info(out).input_kind == "table"
    img, rows = read_folder(out)
    txt, _ = read_folder(out, "text")
    assert [r["image_path"] for r in rows] == [str(p) for p in paths]
    assert [r["caption"] for r in rows] == captions
    for col, values in expect_extra.items():
        assert [r[col] for r in rows] == values
    assert max_err(img, ref_images(reference, paths)) <= FP16_TOL
    assert max_err(txt, ref_texts(reference, captions)) <= FP16_TOL


def test_caption_file_with_broken_image_keeps_rows_aligned(captioned, model_dir, reference, tmp_path):
    root, paths, captions = captioned
    file = tmp_path / "pairs.tsv"
    lines = [f"{p}\t{c}" for p, c in zip(paths, captions)]
    lines.insert(2, f"{tmp_path / 'missing.jpg'}\tnot there")
    file.write_text("filepath\ttitle\n" + "\n".join(lines) + "\n")
    res = embed_tiny(file, tmp_path / "out", model_dir, part_size=3)
    img, rows = read_folder(tmp_path / "out")
    txt, _ = read_folder(tmp_path / "out", "text")
    assert res.rows == 5 and res.failed == 1 and [r["caption"] for r in rows] == captions
    assert max_err(txt, ref_texts(reference, captions)) <= FP16_TOL  # row i's caption is row i's text embedding
    assert max_err(img, ref_images(reference, paths)) <= FP16_TOL
    assert layout.read_failed(tmp_path / "out")[0]["reason"].startswith("FileNotFoundError")


def test_text_file(model_dir, reference, tmp_path):
    captions = [f"caption {i}: " + "word " * (i % 7) for i in range(11)]
    file = tmp_path / "captions.txt"
    file.write_text("\n".join(captions[:5]) + "\n\n" + "\n".join(captions[5:]) + "\n")  # a blank line is skipped
    res = embed_tiny(file, tmp_path / "out", model_dir, part_size=4)
    assert res.modalities == ("text",) and res.rows == 11 and res.parts == 3
    assert not (tmp_path / "out" / "img_emb").exists()
    txt, rows = read_folder(tmp_path / "out", "text")
    assert [r["caption"] for r in rows] == [c.strip() for c in captions] and "image_path" not in rows[0]
    assert max_err(txt, ref_texts(reference, [c.strip() for c in captions])) <= FP16_TOL


def write_tar(path: Path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(captioned, model_dir, reference, tmp_path):
    root, paths, captions = captioned
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = [(f"s{i:04d}", {"jpg" if p.suffix == ".jpg" else "png": p.read_bytes(), "txt": c.encode()})
               for i, (p, c) in enumerate(zip(paths, captions))]
    broken = ("s9998", {"jpg": b"garbage", "txt": b"a broken image"})
    no_caption = ("s9999", {"jpg": paths[0].read_bytes()})
    write_tar(shards / "shard-000.tar", samples[:3] + [broken])
    write_tar(shards / "shard-001.tar", [no_caption] + samples[3:])
    pipes = f"pipe:cat {shards}/shard-000.tar::pipe:cat {shards}/shard-001.tar"
    for spec in (f"{shards}/shard-{{000..001}}.tar", pipes):
        assert detect_input_kind(spec) == "webdataset"
        out = tmp_path / ("out" if spec.startswith("/") else "out_pipe")
        res = embed_tiny(spec, out, model_dir, part_size=1, workers=2, batch_size=2)
        assert res.complete and res.parts == 2 and res.rows == 5 and res.failed == 2
        img, rows = read_folder(out)
        txt, _ = read_folder(out, "text")
        assert [r["image_path"] for r in rows] == [s[0] for s in samples]
        assert [r["caption"] for r in rows] == captions
        assert rows[0]["shard"].endswith("shard-000.tar") and rows[-1]["shard"].endswith("shard-001.tar")
        assert max_err(img, ref_images(reference, paths)) <= FP16_TOL
        assert max_err(txt, ref_texts(reference, captions)) <= FP16_TOL
        reasons = sorted(f["reason"].split(":")[0] for f in layout.read_failed(out))
        assert reasons == ["MissingCaption", "UnidentifiedImageError"]


# ---- resume, settings, distribution --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


SLOW_EMBED = """
import sys, time
from clipforge.retrieval import embed as E
encode = E.Encoder.encode_images
E.Encoder.encode_images = lambda self, images: (time.sleep(0.05), encode(self, images))[1]
from clipforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_rerun_completes_without_duplicates(model_dir, tmp_path, capsys):
    root = tmp_path / "photos"
    paths = write_images(root, 60, seed=3, size=(32, 32))
    out = tmp_path / "out"
    args = ["embed", str(root), str(out), "--model", f"local-dir:{model_dir}", "--part-size", "6",
            "--batch-size", "2", "--workers", "0", "--modalities", "image", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EMBED, *args], env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not layout.complete_parts(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # into the second part
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, log
    done = layout.complete_parts(out)
    assert 1 <= len(done) < 10 and not layout.read_info(out).complete, done

    assert cli_main(args) == 0  # the rerun: the same command line
    printed = capsys.readouterr().out
    assert "60 rows in 10 parts" in printed and f"this run: {10 - len(done)} parts" in printed, printed
    emb, rows = read_folder(out)
    assert [r["image_path"] for r in rows] == [str(p) for p in paths]  # none missing, none twice
    assert not list(out.rglob("*.tmp"))

    embed_tiny(root, tmp_path / "whole", model_dir, part_size=6, batch_size=2)
    whole, whole_rows = read_folder(tmp_path / "whole")
    assert whole_rows == rows and max_err(emb, whole) <= 1e-6


def test_changed_settings_refused_and_overwrite(folder, model_dir, tmp_path, capsys):
    root, good, _ = folder
    out = tmp_path / "out"
    first = embed_tiny(root, out, model_dir, part_size=5)
    again = embed_tiny(root, out, model_dir, part_size=5)
    assert again.new_parts == 0 and again.rows == first.rows == 14
    with pytest.raises(ValueError, match=r"part_size: 5 there, 7 now"):
        embed_tiny(root, out, model_dir, part_size=7)
    with pytest.raises(ValueError, match=r"dtype.*precision"):
        embed_tiny(root, out, model_dir, part_size=5, dtype="float32", precision="bf16")
    with pytest.raises(ValueError, match=r"input"):
        embed_tiny(root / "d0", out, model_dir, part_size=5)
    res = embed_tiny(root, out, model_dir, part_size=7, overwrite=True)
    assert res.parts == 3 and layout.read_info(out).part_size == 7 and layout.complete_parts(out) == [0, 1, 2]
    code = cli_main(["embed", str(root), str(out), "--model", f"local-dir:{model_dir}", "--part-size", "9",
                     "--no-progress"])
    printed = capsys.readouterr()
    assert code != 0 and "part_size: 7 there, 9 now" in printed.err + printed.out


def test_part_assignment():
    for world in (1, 2, 3, 7):
        owned = [assign_parts(10, r, world) for r in range(world)]
        assert sorted(p for ps in owned for p in ps) == list(range(10))
        assert all(p % world == r for r, ps in enumerate(owned) for p in ps)
    with pytest.raises(ValueError):
        assign_parts(10, 2, 2)


def test_torchrun_two_ranks_equal_one_process(folder, model_dir, tmp_path):
    root, good, _ = folder
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "clipforge", "embed", str(root), str(out), "--model",
           f"local-dir:{model_dir}", "--part-size", "3", "--batch-size", "2", "--workers", "0", "--device", "cpu",
           "--no-progress"]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "14 rows in 5 parts" in run.stdout and "rank 0 of 2" in run.stdout
    embed_tiny(root, tmp_path / "single", model_dir, part_size=3, batch_size=2)
    emb, rows = read_folder(out)
    single, single_rows = read_folder(tmp_path / "single")
    assert rows == single_rows and max_err(emb, single) <= 1e-6
    assert layout.read_info(out).complete and len(layout.read_failed(out)) == 1
