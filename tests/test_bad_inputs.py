"""A corpus of bad images and bad caption files through every consumer: train, eval, classify, shards, embed.

The contract checked, per input: an image that is valid but odd (CMYK, 16-bit grey, palette with
transparency, RGBA, 1x1, grey JPEG, EXIF-rotated, large) is decoded and used, and its tensor equals
OpenCLIP's ``preprocess(Image.open(p))`` (the file's mode kept until after the resize, EXIF
orientation not applied); a broken one (truncated, zero bytes, text, two decompression bombs,
missing) is skipped and reported with its file and reason by the consumers that skip (train,
classify, shards, embed), or stops the run with one error naming the file where exactness needs
every item (eval).
A broken caption file (no image column, header only, a row with missing fields, bytes that are not
UTF-8) stops every consumer with an error naming the file. Never a crash, a hang, or a silent wrong
count. The tally (bad inputs run and mishandled, per consumer) is printed at the end and written
to ``bad_inputs_report.json`` in pytest's base temp folder. Run alone with ``pytest -m reliability``.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tarfile
import time
import zlib
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipforge.checkpoints.openclip_hub import save_openclip_dir
from clipforge.cli import main as cli_main
from clipforge.config import CLIPConfig
from clipforge.data.captions import CaptionDataset, read_caption_file
from clipforge.data.robust import DataError
from clipforge.models.clip import CLIP
from clipforge.retrieval import layout
from clipforge.retrieval.embed import embed
from clipforge.transforms import ImageLoadError, load_image

from train_utils import TINY_MODEL, tiny_config

pytestmark = [pytest.mark.reliability,  # the second bomb warns (then fails): expected, not news
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]

TALLY = defaultdict(lambda: {"inputs": 0, "mishandled": 0})  # consumer -> counts
FP16_TOL, FP32_TOL = 1e-3, 1e-5
# why each broken image fails: the category describe_exception gives (the skip/failed reason's prefix)
BROKEN_REASONS = {"truncated": "OSError", "empty": "UnidentifiedImageError", "text": "UnidentifiedImageError",
                  "bomb": "DecompressionBombError", "bomb_warned": "OSError", "missing": "FileNotFoundError"}


def tally(consumer: str, inputs: int, problems: List[str]) -> None:
    TALLY[consumer]["inputs"] += inputs
    TALLY[consumer]["mishandled"] += len(problems)


@pytest.fixture(scope="module", autouse=True)
def _report(tmp_path_factory, pytestconfig):
    yield
    report = {k: dict(v) for k, v in sorted(TALLY.items())}
    total = sum(v["inputs"] for v in report.values())
    bad = sum(v["mishandled"] for v in report.values())
    path = tmp_path_factory.getbasetemp() / "bad_inputs_report.json"
    path.write_text(json.dumps({"inputs": total, "mishandled": bad, "by_consumer": report}, indent=2) + "\n")
    line = f"bad inputs: {total} inputs, {bad} mishandled: {json.dumps(report)} ({path})"
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + line, flush=True)  # shown even when output is captured


# ---- the corpus ----------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int) -> bytes:
    """A PNG whose header claims ``side`` x ``side`` grey pixels, with one tiny IDAT: ~100 bytes on disk."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def write_corpus(root: Path) -> SimpleNamespace:
    """Good, valid-but-odd and broken images under ``root/images`` (name -> path; ``missing`` is not written)."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def noise(h: int = 40, w: int = 48) -> np.ndarray:
        return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)

    good: Dict[str, Path] = {}
    for i in range(4):
        good[f"good_{i}"] = images / f"good_{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(noise()).save(good[f"good_{i}"], **({} if i % 2 else {"quality": 90}))
    odd = {k: images / name for k, name in [("cmyk", "cmyk.jpg"), ("gray16", "gray16.png"), ("palette", "palette.png"),
                                            ("rgba", "rgba.png"), ("one_px", "one_px.png"), ("gray", "gray.jpg"),
                                            ("exif", "exif_rotated.jpg"), ("large", "large.png")]}
    Image.fromarray(noise()).convert("CMYK").save(odd["cmyk"], quality=90)
    Image.fromarray(rng.integers(0, 65535, (40, 48)).astype(np.uint16)).save(odd["gray16"])  # mode I;16
    Image.fromarray(noise()).quantize(16).save(odd["palette"], transparency=0)
    Image.fromarray(np.concatenate([noise(), noise()[..., :1]], axis=2), "RGBA").save(odd["rgba"])
    Image.new("RGB", (1, 1), (200, 30, 40)).save(odd["one_px"])
    Image.fromarray(noise()[..., 0]).save(odd["gray"], quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(noise(32, 56)).save(odd["exif"], quality=90, exif=exif.tobytes())
    large = np.zeros((1500, 2000, 3), np.uint8)  # 3 Mpixel, small on disk
    large[:, :1000] = (10, 200, 30)
    large[500:] += 40
    Image.fromarray(large).save(odd["large"])
    broken = {k: images / name for k, name in [("truncated", "truncated.jpg"), ("empty", "empty.jpg"),
                                               ("text", "text.jpg"), ("bomb", "bomb.png"),
                                               ("bomb_warned", "bomb_warned.png"), ("missing", "missing.jpg")]}
    whole = images / "whole.tmp"
    Image.fromarray(noise(64, 64)).save(whole, format="JPEG", quality=90)
    data = whole.read_bytes()
    whole.unlink()
    broken["truncated"].write_bytes(data[: len(data) // 3])
    broken["empty"].write_bytes(b"")
    broken["text"].write_text("this is not a picture\n")
    broken["bomb"].write_bytes(bomb_png(20000))  # 4e8 pixels > 2 x Image.MAX_IMAGE_PIXELS: refused at open
    # 9500^2 is between 1 and 2 x the limit: PIL only warns, allocates 90 MB and fails on the missing data
    broken["bomb_warned"].write_bytes(bomb_png(9500))
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None and 20000 ** 2 > 2 * limit > 9500 ** 2 > limit
    return SimpleNamespace(root=root, good=good, odd=odd, broken=broken, usable={**good, **odd})


def caption_of(name: str) -> str:
    return f"a picture called {name.replace('_', ' ')}"


def write_table(path: Path, names_paths, column: str = "title", extra_rows: List[str] = ()) -> Path:
    """``filepath<TAB>column`` rows (paths relative to ``path``'s folder), then ``extra_rows`` verbatim."""
    rows = [f"{p.relative_to(path.parent).as_posix()}\t{caption_of(n)}" for n, p in names_paths]
    path.write_text(f"filepath\t{column}\n" + "\n".join(rows + list(extra_rows)) + "\n")
    return path


def write_bad_caption_files(root: Path) -> Dict[str, Path]:
    """Caption files every consumer must refuse with an error naming the file (not UTF-8: separate)."""
    files = {"no_image_column": "path\ttitle\nimages/good_0.jpg\ta picture\n",
             "header_only": "filepath\ttitle\n",
             "missing_field": "filepath\ttitle\nimages/good_0.jpg\ta picture\nimages/good_1.png\n"}
    out = {}
    for name, text in files.items():
        out[name] = root / f"{name}.tsv"
        out[name].write_text(text)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SimpleNamespace:
    c = write_corpus(tmp_path_factory.mktemp("corpus"))
    c.bad_files = write_bad_caption_files(c.root)
    c.non_utf8 = c.root / "non_utf8.tsv"
    c.non_utf8.write_bytes(b"filepath\ttitle\nimages/good_0.jpg\tcaf\xe9 au lait\n")  # Latin-1, not UTF-8
    return c


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_openclip_dir(CLIP(CLIPConfig.from_dict(TINY_MODEL)).eval(), path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """open_clip's model, eval preprocessing and tokenizer for the same folder: the independent reference."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    return SimpleNamespace(model=model.eval(), preprocess=preprocess,
                           tokenizer=open_clip.get_tokenizer(f"local-dir:{model_dir}"))


def pil_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def openclip_pixels(reference, path: Path) -> torch.Tensor:
    """OpenCLIP's tensor for a file, as its users make it: ``preprocess(Image.open(p))``."""
    with Image.open(path) as img:
        return reference.preprocess(img)


def ref_image_features(reference, paths) -> np.ndarray:
    with torch.no_grad():
        feats = reference.model.encode_image(torch.stack([openclip_pixels(reference, p) for p in paths]))
    return torch.nn.functional.normalize(feats, dim=-1).numpy()


def ref_text_features(reference, texts) -> np.ndarray:
    with torch.no_grad():
        feats = reference.model.encode_text(reference.tokenizer(list(texts)))
    return torch.nn.functional.normalize(feats, dim=-1).numpy()


def max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def run_cli(capsys, *args: str):
    capsys.readouterr()
    code = cli_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_refuses(capsys, consumer: str, args, path: Path) -> List[str]:
    """Problems (empty when fine) of a command that must stop with one stderr line naming ``path``."""
    try:
        code, _, err = run_cli(capsys, *args)
    except (Exception, SystemExit) as e:  # a traceback out of the CLI is itself the problem
        return [f"{consumer} {path.name}: raised {type(e).__name__}: {e}"]
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    if code != 1 or len(lines) != 1 or str(path) not in lines[0]:
        return [f"{consumer} {path.name}: exit {code}, stderr {err.strip()[-300:]!r}"]
    return []


# ---- the opener every consumer shares -------------------------------------------------------------------
def test_load_image_decodes_odd_images_and_names_broken_ones(corpus):
    problems = []
    for name, path in corpus.odd.items():
        got = np.asarray(load_image(path))
        want = np.asarray(pil_rgb(path))
        if got.shape != want.shape or not np.array_equal(got, want):
            problems.append(f"{name}: load_image differs from PIL convert('RGB')")
    for name, path in corpus.broken.items():
        start = time.perf_counter()
        try:
            load_image(path)
            problems.append(f"{name}: opened without an error")
        except ImageLoadError as e:
            if str(path) not in str(e) or BROKEN_REASONS[name] not in str(e):
                problems.append(f"{name}: message {e} lacks the file or the reason {BROKEN_REASONS[name]}")
        if time.perf_counter() - start > 5:  # the bomb is refused from its header, before any pixel is allocated
            problems.append(f"{name}: {time.perf_counter() - start:.1f} s to refuse")
    with Image.open(corpus.odd["exif"]) as img:  # stored 56x32, displayed 32x56: orientation is not applied
        assert img.getexif().get(0x0112) == 6 and load_image(corpus.odd["exif"]).size == (56, 32)
    tally("load_image", len(corpus.odd) + len(corpus.broken), problems)
    assert not problems


def test_odd_images_through_the_model_transform_match_open_clip(corpus, model_dir, reference):
    """For every odd mode clipforge's tensor is OpenCLIP's ``preprocess(Image.open(p))`` exactly: the
    eval transform gets the file's own mode and converts after resizing, as OpenCLIP's does (alpha is
    resized premultiplied, palettes nearest-neighbour); an RGB decode first would differ for those."""
    from clipforge import create_model_and_transforms
    from clipforge.transforms import load_image_for

    _, _, transform = create_model_and_transforms(f"local-dir:{model_dir}")
    problems = []
    for name in corpus.odd:
        want = openclip_pixels(reference, corpus.odd[name])
        got = transform(load_image_for(transform, corpus.odd[name]))
        if got.shape != (3, 32, 32) or not torch.equal(got, want):
            problems.append(f"{name}: differs from open_clip by {max_err(got, want)}")
    tally("load_image", 0, problems)
    assert not problems


# ---- training -------------------------------------------------------------------------------------------
def test_train_skips_every_broken_sample_and_lists_it(corpus, model_dir, tmp_path):
    from clipforge.train import TrainConfig, train

    data = write_table(corpus.root / "train.tsv", [*corpus.usable.items(), *corpus.broken.items()],
                       extra_rows=["images/good_0.jpg\t"])  # an empty caption: skipped too
    n_rows, n_bad = len(corpus.usable) + len(corpus.broken) + 1, len(corpus.broken) + 1
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, data, batch_size=6,
                                            data={"max_bad_fraction": 0.9, "min_seen": 1000, "drop_last": False}))
    summary = train(cfg)
    problems = []
    lines = [json.loads(x) for x in (cfg.run_dir / "skipped.jsonl").read_text().splitlines()]
    listed = {Path(r["file"]).name: r for r in lines if not r["reason"].startswith("EmptyCaption")}
    if summary["data"]["seen"] != n_rows or summary["data"]["skipped"] != n_bad or len(lines) != n_bad:
        problems.append(f"counts: {summary['data']}, {len(lines)} lines in skipped.jsonl; want {n_rows} seen, "
                        f"{n_bad} skipped")
    for name, path in corpus.broken.items():
        row = listed.get(path.name)
        if row is None or not row["reason"].startswith(BROKEN_REASONS[name]) or "train.tsv:" not in row["source"]:
            problems.append(f"{name}: skipped.jsonl row {row}")
    empty = [r for r in lines if r["reason"].startswith("EmptyCaption")]
    if len(empty) != 1 or not empty[0]["source"].endswith(f"train.tsv:{n_rows + 1}"):
        problems.append(f"empty caption: {empty}")
    for name, path in corpus.usable.items():
        if path.name in listed:
            problems.append(f"{name}: a valid image was skipped: {listed[path.name]['reason']}")
    tally("train", n_bad + len(corpus.odd), problems)
    shutil.rmtree(cfg.run_dir / "checkpoints")  # 50 MB of tiny checkpoints
    assert not problems


def test_train_dataset_decodes_odd_images_as_open_clip_does(corpus, model_dir, reference):
    """The training dataset's tensor for each odd image: with clipforge's transform OpenCLIP's
    ``preprocess(Image.open(p))``; with a transform that is not clipforge's (here OpenCLIP's own, which
    may expect RGB) the transform of PIL's RGB decode."""
    from clipforge import create_model_and_transforms

    _, _, transform = create_model_and_transforms(f"local-dir:{model_dir}")
    records = [r for r in read_caption_file(write_table(corpus.root / "odd.tsv", corpus.odd.items()))]
    ours = CaptionDataset(records, transform, reference.tokenizer)
    foreign = CaptionDataset(records, reference.preprocess, reference.tokenizer)
    problems = [f"{rec.path.name}: {max_err(ours[i][0], openclip_pixels(reference, rec.path))}"
                for i, rec in enumerate(records)
                if not torch.equal(ours[i][0], openclip_pixels(reference, rec.path))]
    problems += [f"{rec.path.name} (foreign transform): not the RGB decode" for i, rec in enumerate(records)
                 if not torch.equal(foreign[i][0], reference.preprocess(pil_rgb(rec.path)))]
    tally("train", 0, problems)
    assert not problems


def test_train_refuses_bad_caption_files_naming_them(corpus, tmp_path):
    from clipforge.train import TrainConfig, train

    problems = []
    for name, path in corpus.bad_files.items():
        try:
            train(TrainConfig.from_dict(tiny_config(tmp_path, path, name=name)))
            problems.append(f"{name}: trained")
        except DataError as e:
            if str(path) not in str(e):
                problems.append(f"{name}: {e} does not name the file")
    tally("train", len(corpus.bad_files), problems)
    assert not problems


# ---- eval -----------------------------------------------------------------------------------------------
def test_eval_retrieval_uses_odd_images_and_stops_at_a_broken_one_naming_it(corpus, model_dir, reference, tmp_path,
                                                                            capsys):
    """Evaluation is exact, so it does not skip: a broken image stops it with one error naming the file
    (documented in ImageListDataset); odd images are evaluated, with clip_benchmark's metrics equal to
    brute-force recall on open_clip's features of PIL's RGB decode."""
    usable = list(corpus.usable.items())
    rows = [f"{p}\t{caption_of(n)}" for n, p in usable]  # absolute paths: the tables live in tmp_path
    table = tmp_path / "ok.tsv"
    table.write_text("filepath\tcaption\n" + "\n".join(rows) + "\n")
    model = f"local-dir:{model_dir}"
    base = ["eval", "--model", model, "--task", "zeroshot_retrieval", "--recall_k", "[1,2]", "--batch_size", "4"]
    code, out, err = run_cli(capsys, *base, "--dataset", str(table), "--output", str(tmp_path / "ok.json"))
    problems = [] if code == 0 else [f"odd images: exit {code}: {err}"]
    if code == 0:
        metrics = json.loads((tmp_path / "ok.json").read_text())["metrics"]
        img, txt = ref_image_features(reference, [p for _, p in usable]), ref_text_features(
            reference, [caption_of(n) for n, _ in usable])
        sim = txt @ img.T  # text i belongs to image i
        for k in (1, 2):
            text_to_image = np.mean([i in np.argsort(-sim[i])[:k] for i in range(len(usable))])
            image_to_text = np.mean([i in np.argsort(-sim[:, i])[:k] for i in range(len(usable))])
            if abs(metrics[f"image_retrieval_recall@{k}"] - text_to_image) > 1e-6 or \
                    abs(metrics[f"text_retrieval_recall@{k}"] - image_to_text) > 1e-6:
                problems.append(f"recall@{k}: {metrics} vs brute force {text_to_image}, {image_to_text}")
    for name, path in corpus.broken.items():
        bad = tmp_path / f"with_{name}.tsv"
        bad.write_text("filepath\tcaption\n" + "\n".join(rows[:3] + [f"{path}\tbroken {name}"] + rows[3:]) + "\n")
        problems += cli_refuses(capsys, "eval", [*base, "--dataset", str(bad), "--output", str(tmp_path / "x.json")],
                                path)
        if (tmp_path / "x.json").exists():
            problems.append(f"{name}: a result was written")
    coco = tmp_path / "captions.json"  # COCO pointing at a missing image, paths relative to --image_root
    listed = [p for _, p in usable[:3]] + [corpus.broken["missing"]]
    coco.write_text(json.dumps({"images": [{"id": i, "file_name": p.name} for i, p in enumerate(listed)],
                                "annotations": [{"image_id": i, "id": i, "caption": f"caption {i}"}
                                                for i in range(len(listed))]}))
    problems += cli_refuses(capsys, "eval", [*base, "--dataset", str(coco), "--image_root", str(corpus.root / "images"),
                                             "--output", str(tmp_path / "coco.json")], corpus.broken["missing"])
    for name, path in corpus.bad_files.items():
        problems += cli_refuses(capsys, "eval", [*base, "--dataset", str(path), "--output", str(tmp_path / "y.json")],
                                path)
    tally("eval", len(corpus.odd) + len(corpus.broken) + 1 + len(corpus.bad_files), problems)
    assert not problems


# ---- classify -------------------------------------------------------------------------------------------
def test_classify_reports_each_bad_image_and_classifies_the_others(corpus, model_dir, reference, capsys):
    labels = ["red", "green", "noise"]
    broken, paths = list(corpus.broken.values()), []
    for i, path in enumerate(corpus.usable.values()):  # each bad one between good ones
        paths += [path] + broken[i:i + 1]
    code, out, err = run_cli(capsys, "classify", *map(str, paths), "--labels", ",".join(labels), "--model",
                             f"local-dir:{model_dir}", "--top_k", "3")
    problems = [] if code == 1 else [f"exit code {code}"]
    err_lines = err.strip().splitlines()
    for name, path in corpus.broken.items():
        hits = [ln for ln in err_lines if str(path) in ln]
        if len(hits) != 1 or BROKEN_REASONS[name] not in hits[0]:
            problems.append(f"{name}: stderr lines {hits}")
    blocks = {}  # printed path -> {label: probability}
    for line in out.splitlines():
        if not line.startswith(" "):
            current = blocks.setdefault(line.strip(), {})
        elif "%" in line:
            prob, label = line.split("%", 1)
            current[label.strip()] = float(prob) / 100
    usable = list(corpus.usable.values())
    if list(blocks) != [str(p) for p in usable]:
        problems.append(f"classified {list(blocks)}")
    else:
        img = ref_image_features(reference, usable)
        txt = ref_text_features(reference, [f"a photo of a {label}." for label in labels])
        probs = torch.softmax(reference.model.logit_scale.exp().item() * torch.from_numpy(img @ txt.T), dim=-1)
        for i, path in enumerate(usable):
            want = {label: float(probs[i, j]) for j, label in enumerate(labels)}
            if any(abs(blocks[str(path)][label] - want[label]) > 6e-5 for label in labels):
                problems.append(f"{path.name}: {blocks[str(path)]} vs open_clip {want}")
    tally("classify", len(corpus.broken) + len(corpus.odd), problems)
    assert not problems


# ---- shards ---------------------------------------------------------------------------------------------
def _shard_contents(out: Path) -> Dict[str, bytes]:
    members = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    return members


def _shards_problems(corpus, tmp_path, capsys, broken_names) -> List[str]:
    broken = [(n, corpus.broken[n]) for n in broken_names]
    data = write_table(corpus.root / f"shards_{len(broken)}.tsv", [*corpus.usable.items(), *broken],
                       extra_rows=["images/good_0.jpg\t "])  # a blank caption
    out = tmp_path / f"shards_{len(broken)}"
    code, printed, err = run_cli(capsys, "shards", str(data), str(out), "--max_count_per_shard", "5")
    if code != 0:
        return [f"exit {code}: {err}"]
    problems = []
    members = _shard_contents(out)
    images = [v for k, v in sorted(members.items()) if not k.endswith(".txt")]
    captions = [v.decode() for k, v in sorted(members.items()) if k.endswith(".txt")]
    if images != [p.read_bytes() for p in corpus.usable.values()] or \
            captions != [caption_of(n) for n in corpus.usable]:
        problems.append(f"shard contents: {len(images)} images, want the {len(corpus.usable)} usable ones in order")
    sizes = json.loads((out / "sizes.json").read_text())
    if sum(sizes.values()) != len(corpus.usable):
        problems.append(f"sizes.json counts {sum(sizes.values())}")
    report = printed + err
    for name, path in broken:
        if not any(str(path) in ln and BROKEN_REASONS[name] in ln for ln in report.splitlines()):
            problems.append(f"{name}: not reported as skipped")
    if f"({len(broken) + 1} skipped)" not in printed or "EmptyCaption" not in report:
        problems.append(f"skip count or blank caption not reported: {printed[:200]!r}")
    return problems


def test_shards_skip_missing_files_and_empty_captions(corpus, tmp_path, capsys):
    problems = _shards_problems(corpus, tmp_path, capsys, ["missing"])
    tally("shards", 2 + len(corpus.odd), problems)
    assert not problems


def test_shards_skip_undecodable_images(corpus, tmp_path, capsys):
    names = ["truncated", "empty", "text", "bomb", "bomb_warned"]
    problems = _shards_problems(corpus, tmp_path, capsys, names)
    tally("shards", len(names), [n for n in names if any(p.startswith(f"{n}:") for p in problems)])
    assert not problems


def test_shards_refuse_bad_caption_files_naming_them(corpus, tmp_path, capsys):
    problems = []
    for name, path in corpus.bad_files.items():
        problems += cli_refuses(capsys, "shards", ["shards", str(path), str(tmp_path / name)], path)
    tally("shards", len(corpus.bad_files), problems)
    assert not problems


# ---- embed ----------------------------------------------------------------------------------------------
def _read_embeddings(out: Path, modality: str = "image"):
    """(embeddings, metadata rows) of every part, in part order."""
    rows = []
    for p in layout.complete_parts(out):
        rows += pq.read_table(layout.metadata_path(out, p)).to_pylist()
    return layout.load_embeddings(out, modality), rows


def test_embed_folder_and_table_list_broken_inputs_and_keep_rows_aligned(corpus, model_dir, reference, tmp_path):
    model = f"local-dir:{model_dir}"
    problems = []
    # a folder: every image file under it (the missing one is simply not there)
    out = tmp_path / "folder"
    res = embed(corpus.root / "images", out, model, workers=0, batch_size=4, part_size=5, progress=False,
                dtype="float32")
    on_disk = {n: p for n, p in corpus.broken.items() if n != "missing"}
    failed = {Path(f["source"]).name: f["reason"] for f in layout.read_failed(out)}
    if (res.rows, res.failed) != (len(corpus.usable), len(on_disk)):
        problems.append(f"folder: {res.rows} rows, {res.failed} failed")
    for name, path in on_disk.items():
        if not failed.get(path.name, "").startswith(BROKEN_REASONS[name]):
            problems.append(f"folder {name}: failed.jsonl says {failed.get(path.name)}")
    emb, rows = _read_embeddings(out)
    order = sorted(corpus.usable.values(), key=lambda p: p.name)
    if [r["image_path"] for r in rows] != [str(p) for p in order]:
        problems.append(f"folder rows: {[Path(r['image_path']).name for r in rows]}")
    elif (err := max_err(emb, ref_image_features(reference, order))) > FP32_TOL:
        problems.append(f"folder embeddings differ from open_clip by {err}")
    # a table: broken rows listed, the others keep their captions
    items = list(corpus.usable.items())
    listed = items[:6] + list(corpus.broken.items()) + items[6:]
    table = write_table(corpus.root / "embed.tsv", listed)
    out = tmp_path / "table"
    res = embed(table, out, model, workers=0, batch_size=4, part_size=5, progress=False, dtype="float32")
    failed = {Path(f["source"]).name: f["reason"] for f in layout.read_failed(out)}
    if (res.rows, res.failed) != (len(items), len(corpus.broken)):
        problems.append(f"table: {res.rows} rows, {res.failed} failed")
    for name, path in corpus.broken.items():
        if not failed.get(path.name, "").startswith(BROKEN_REASONS[name]):
            problems.append(f"table {name}: failed.jsonl says {failed.get(path.name)}")
    img, rows = _read_embeddings(out)
    txt, _ = _read_embeddings(out, "text")
    if [(r["image_path"], r["caption"]) for r in rows] != [(str(p), caption_of(n)) for n, p in items]:
        problems.append("table rows are not the usable inputs in order with their captions")
    else:
        if max_err(img, ref_image_features(reference, [p for _, p in items])) > FP32_TOL:
            problems.append("table image embeddings differ from open_clip")
        if max_err(txt, ref_text_features(reference, [caption_of(n) for n, _ in items])) > FP32_TOL:
            problems.append("table text embeddings are not aligned with their rows")
    tally("embed", len(on_disk) + len(corpus.broken) + 2 * len(corpus.odd), problems)
    assert not problems


def test_embed_refuses_bad_caption_files_naming_them(corpus, model_dir, tmp_path, capsys):
    problems = []
    for name, path in corpus.bad_files.items():
        problems += cli_refuses(capsys, "embed", ["embed", str(path), str(tmp_path / name), "--model",
                                                  f"local-dir:{model_dir}", "--no-progress"], path)
    tally("embed", len(corpus.bad_files), problems)
    assert not problems


# ---- a caption file that is not UTF-8 -------------------------------------------------------------------
def test_non_utf8_caption_file_is_refused_naming_it(corpus, model_dir, tmp_path, capsys):
    from clipforge.train import TrainConfig, train

    path, model = corpus.non_utf8, f"local-dir:{model_dir}"
    problems = []
    try:
        train(TrainConfig.from_dict(tiny_config(tmp_path, path, name="latin1")))
        problems.append("train: trained")
    except ValueError as e:
        if str(path) not in str(e):
            problems.append(f"train: {type(e).__name__}: {e}")
    tally("train", 1, problems)
    for_eval = path.with_name("non_utf8_eval.tsv")  # eval reads filepath<TAB>caption tables
    for_eval.write_bytes(path.read_bytes().replace(b"title", b"caption"))
    for consumer, args, target in [
            ("shards", ["shards", str(path), str(tmp_path / "s")], path),
            ("embed", ["embed", str(path), str(tmp_path / "e"), "--model", model, "--no-progress"], path),
            ("eval", ["eval", "--model", model, "--task", "zeroshot_retrieval", "--dataset", str(for_eval),
                      "--output", str(tmp_path / "x.json")], for_eval)]:
        found = cli_refuses(capsys, consumer, args, target)
        tally(consumer, 1, found)
        problems += found
    assert not problems
