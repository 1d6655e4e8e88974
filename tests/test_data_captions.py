import json
from pathlib import Path

import pytest
import torch

from clipforge.data import (CaptionGroups, DataConfig, DataError, build_eval_loader, build_train_loader,
                            caption_groups, coco_dataset, collate_skipping, csv_dataset, jsonl_dataset,
                            read_caption_file, read_csv_records, read_table, table_separator)
from test_data_common import detok, make_caption_folder, small_transform, toy_tokenize, write_jpeg, write_tsv

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.mark.parametrize("suffix,sep", [(".tsv", "\t"), (".csv", ",")])
def test_csv_end_to_end(tmp_path, suffix, sep):
    pairs = make_caption_folder(tmp_path, 4)
    f = write_tsv(tmp_path / f"caps{suffix}", pairs, sep=sep)
    ds = csv_dataset(f, small_transform, toy_tokenize)  # separator chosen by extension
    assert len(ds) == 4
    img, tok = ds[2]
    assert img.shape == (3, 8, 8) and tok.dtype == torch.long
    assert detok(tok) == "caption number 2"
    assert ds.records[2].path == tmp_path / "images/img002.jpg"


def test_csv_custom_keys_quotes_and_sep_option(tmp_path):
    write_jpeg(tmp_path / "sub" / "a.jpg", 0)
    f = tmp_path / "c.csv"
    f.write_text('id,img,cap\n1,sub/a.jpg,"hello, world"\n', encoding="utf-8")
    recs = read_csv_records(f, img_key="img", caption_key="cap")
    assert recs[0].caption == "hello, world" and recs[0].path == tmp_path / "sub" / "a.jpg"
    g = tmp_path / "c.txt"  # unknown suffix and a ';' header: only an explicit separator reads it
    g.write_text('img;cap\nsub/a.jpg;he said "hi\n', encoding="utf-8")
    assert read_csv_records(g, img_key="img", caption_key="cap", sep=";")[0].caption == 'he said "hi'


@pytest.mark.parametrize("name,header,sep", [
    ("a.tsv", "filepath\ttitle", "\t"), ("a.tab", "filepath\ttitle", "\t"), ("a.csv", "filepath,title", ","),
    # Other names go by their header. The two old rules disagreed here: captions.py read any
    # non-.csv file as tab-separated, evaluate/datasets.py any non-.tsv file as comma-separated.
    ("a.txt", "filepath\ttitle", "\t"), ("a.txt", "filepath,title", ","), ("noext", "filepath,title", ","),
])
def test_one_separator_rule(tmp_path, name, header, sep):
    write_jpeg(tmp_path / "x.jpg", 0)
    f = tmp_path / name
    f.write_text(f"{header}\nx.jpg{sep}a caption\n", encoding="utf-8")
    assert table_separator(f) == sep
    assert [(r.path.name, r.caption) for r in read_csv_records(f)] == [("x.jpg", "a caption")]
    assert read_table(f, ("filepath",))[0].values == {"filepath": "x.jpg", "title": "a caption"}


def test_suffix_wins_over_header_and_ambiguous_headers_fail(tmp_path):
    f = tmp_path / "a.tsv"
    f.write_text("filepath,title\nx.jpg,cap\n", encoding="utf-8")
    assert table_separator(f) == "\t"  # .tsv is a tab file, so this header is one column
    with pytest.raises(DataError, match=r"a\.tsv: header \['filepath,title'\] lacks column"):
        read_csv_records(f)
    for header in ("filepath\ttitle,extra", "filepath;title"):
        g = tmp_path / "b.txt"
        g.write_text(f"{header}\nx\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"b\.txt: cannot tell the separator"):
            read_csv_records(g)
    assert table_separator(g, "tab") == table_separator(g, "\\t") == "\t"
    h = tmp_path / "h.csv"
    h.write_text("filepath,title\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"h\.csv: no rows"):
        read_csv_records(h)


def test_read_caption_file_kinds(tmp_path):
    pairs = make_caption_folder(tmp_path, 2)
    tsv = write_tsv(tmp_path / "caps.tsv", pairs)
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text("".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in pairs))
    coco = _coco(tmp_path, n_img=2, caps_per=1)
    expected = [(tmp_path / p, c) for p, c in pairs]
    assert [(r.path, r.caption) for r in read_caption_file(tsv)] == expected
    assert [(r.path, r.caption) for r in read_caption_file(tsv, "tsv")] == expected
    assert [(r.path, r.caption) for r in read_caption_file(jsonl)] == expected
    assert [r.caption for r in read_caption_file(coco)] == ["img 0 cap 0", "img 1 cap 0"]
    with pytest.raises(ValueError, match="unknown caption file kind 'parquet'"):
        read_caption_file(tsv, "parquet")


def test_csv_errors_name_file_and_row(tmp_path):
    f = write_tsv(tmp_path / "c.tsv", [("a.jpg", "x")], header=("path", "title"))
    with pytest.raises(DataError, match=r"c\.tsv.*'filepath'"):
        read_csv_records(f)
    f2 = tmp_path / "bad.tsv"
    f2.write_text("filepath\ttitle\na.jpg\tok\nb.jpg\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.tsv:3: malformed row"):
        read_csv_records(f2)


def _coco(tmp_path, n_img=3, caps_per=2):
    root = tmp_path / "val2017"
    images, anns = [], []
    for i in range(n_img):
        write_jpeg(root / f"{i:012d}.jpg", i)
        images.append({"id": 100 + i, "file_name": f"{i:012d}.jpg"})
        anns += [{"image_id": 100 + i, "id": len(anns) + k, "caption": f"img {i} cap {k}"} for k in range(caps_per)]
    f = tmp_path / "captions_val2017.json"
    f.write_text(json.dumps({"images": images, "annotations": anns}))
    return f


def test_coco_one_sample_per_caption_and_groups(tmp_path):
    f = _coco(tmp_path)
    ds = coco_dataset(f, small_transform, toy_tokenize)
    assert len(ds) == 6 and detok(ds[3][1]) == "img 1 cap 1"
    groups = caption_groups(DataConfig(kind="coco", train_data=str(f)))
    assert len(groups) == 3 and groups.captions[2] == ["img 2 cap 0", "img 2 cap 1"]
    assert groups.text_to_image == [0, 0, 1, 1, 2, 2]
    assert groups.image_to_texts()[1] == [2, 3]
    assert groups.image_dataset(small_transform)[0].shape == (3, 8, 8)


def test_coco_captions_stripped_and_images_found_beside_annotations_folder(tmp_path):
    f = _coco(tmp_path, n_img=2, caps_per=1)
    d = json.loads(f.read_text())
    d["annotations"][0]["caption"] = "  img 0 cap 0 \n"
    (tmp_path / "annotations").mkdir()
    moved = tmp_path / "annotations" / f.name  # COCO's own layout: annotations/ next to val2017/
    moved.write_text(json.dumps(d))
    recs = read_caption_file(moved)
    assert recs[0].caption == "img 0 cap 0" and recs[0].path == tmp_path / "val2017" / "000000000000.jpg"


def test_coco_bad_annotation(tmp_path):
    f = _coco(tmp_path)
    d = json.loads(f.read_text())
    d["annotations"][4]["image_id"] = 999
    f.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"annotations\[4\]"):
        coco_dataset(f, small_transform, toy_tokenize)


def test_jsonl_and_line_errors(tmp_path):
    pairs = make_caption_folder(tmp_path / "imgs", 3, sub=".")
    f = tmp_path / "caps.jsonl"
    f.write_text("".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in pairs))
    ds = jsonl_dataset(f, small_transform, toy_tokenize, image_root=tmp_path / "imgs")
    assert detok(ds[1][1]) == "caption number 1" and ds[1][0].shape == (3, 8, 8)
    f.write_text(f.read_text() + '{"image": "x.jpg"}\n')
    with pytest.raises(DataError, match=r"caps\.jsonl:4"):
        jsonl_dataset(f, small_transform, toy_tokenize)
    f.write_text('{"image": "x.jpg", "caption": "c"}\nnot json\n')
    with pytest.raises(DataError, match=r"caps\.jsonl:2: invalid JSON"):
        jsonl_dataset(f, small_transform, toy_tokenize)


def _broken_csv(tmp_path, n_good=16):
    pairs = make_caption_folder(tmp_path, n_good)
    data = (tmp_path / pairs[0][0]).read_bytes()
    (tmp_path / "images/trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "images/text.jpg").write_bytes(b"this is not an image")
    pairs += [("images/trunc.jpg", "truncated"), ("images/text.jpg", "garbage"),
              ("images/missing.jpg", "missing"), (pairs[1][0], "")]
    return write_tsv(tmp_path / "caps.tsv", pairs)


def test_broken_samples_skipped_and_counted(tmp_path):
    f = _broken_csv(tmp_path)
    cfg = DataConfig(kind="csv", train_data=str(f), max_bad_fraction=0.5, min_seen=1)
    loader = build_eval_loader(cfg, small_transform, toy_tokenize, batch_size=5)
    caps = [detok(t) for _, texts in loader for t in texts]
    assert sorted(caps) == sorted(f"caption number {i}" for i in range(16))
    assert loader.stats.seen == 20 and loader.stats.skipped == 4
    reasons = {e.path.split("/")[-1]: e.reason for e in loader.stats.examples}
    assert set(reasons) == {"trunc.jpg", "text.jpg", "missing.jpg", "img001.jpg"}
    assert "EmptyCaption" in reasons["img001.jpg"] and "FileNotFound" in reasons["missing.jpg"]
    assert "caps.tsv:" in reasons["trunc.jpg"]  # the row is named too


def test_skips_are_counted_by_why_the_image_failed(tmp_path):
    """Not by the ImageLoadError the one opener wraps around each failure."""
    cfg = DataConfig(kind="csv", train_data=str(_broken_csv(tmp_path)), max_bad_fraction=0.5, min_seen=1)
    loader = build_eval_loader(cfg, small_transform, toy_tokenize, batch_size=5)
    list(loader)
    assert loader.stats.reasons == {"EmptyCaption": 1, "FileNotFoundError": 1, "OSError": 1,
                                    "UnidentifiedImageError": 1}


def test_collate_of_all_broken_batch_is_empty():
    from clipforge.data import BrokenSample
    b = collate_skipping([BrokenSample("a", "x"), None])
    assert b.images.shape[0] == 0 and len(b.skipped) == 2 and b.n_seen == 2


def test_max_bad_fraction_raises_naming_files(tmp_path):
    f = _broken_csv(tmp_path, n_good=6)  # 4 of 10 broken
    cfg = DataConfig(kind="csv", train_data=str(f), max_bad_fraction=0.1, min_seen=5)
    loader = build_train_loader(cfg, small_transform, toy_tokenize, batch_size=10, workers=0)
    with pytest.raises(DataError, match=r"4 of 10 samples are broken.*\.jpg"):
        list(loader)


def test_train_loader_with_workers_counts_skips(tmp_path):
    f = _broken_csv(tmp_path, n_good=16)
    cfg = DataConfig(kind="csv", train_data=str(f), max_bad_fraction=0.5, drop_last=False)
    loader = build_train_loader(cfg, small_transform, toy_tokenize, batch_size=4, workers=2)
    n = sum(len(t) for _, t in loader)
    assert n == 16 and loader.stats.skipped == 4 and loader.num_batches == 5


def test_flickr8k_dev_groups():
    tsv = SHARED / "data" / "flickr8k" / "dev" / "captions.tsv"
    if not tsv.exists():
        pytest.skip(f"{tsv} not present")
    cfg = DataConfig(kind="csv", train_data=str(tsv), img_key="filepath", caption_key="caption")
    groups = caption_groups(cfg)
    assert isinstance(groups, CaptionGroups)
    assert len(groups.texts) == 5000 and len(groups) == 1000
    assert all(len(c) == 5 for c in groups.captions)
    assert groups.image_dataset(small_transform)[0].shape == (3, 8, 8)
