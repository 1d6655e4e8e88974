"""Evaluation datasets: labelled images for classification, images with several captions for retrieval.

Kept apart from ``clipforge.data`` (training pipelines) on purpose: evaluation needs a fixed order,
every caption of an image together, and class names/templates travelling with the data.
Classification items are ``(image, label)``; retrieval items are ``(image, [captions])`` and need
``captions_collate`` in the DataLoader.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image
from torch.utils.data import Dataset, default_collate

PathLike = Union[str, Path]
TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")


def _load_rgb(path: PathLike) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err


class LabeledImages(Dataset):
    """``(transform(image), label)`` from ``(path, label)`` pairs; carries ``classnames`` and ``templates``."""

    def __init__(self, samples: Sequence[Tuple[PathLike, int]], classnames: Optional[List[str]],
                 transform: Optional[Callable] = None, templates: Optional[List[str]] = None):
        self.samples = list(samples)
        self.classnames = classnames
        self.templates = templates
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = _load_rgb(path)
        return (self.transform(img) if self.transform else img), label


class CaptionedImages(Dataset):
    """``(transform(image), [captions])`` from ``(path, captions)`` pairs, in the given image order."""

    def __init__(self, items: Sequence[Tuple[PathLike, List[str]]], transform: Optional[Callable] = None):
        self.items = list(items)
        self.transform = transform
        self.classnames = self.templates = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, captions = self.items[i]
        img = _load_rgb(path)
        return (self.transform(img) if self.transform else img), list(captions)


def captions_collate(batch):
    """Stack images but keep each image's captions as its own list (default_collate would zip them)."""
    images, captions = zip(*batch)
    return default_collate(list(images)), [list(c) for c in captions]


def image_folder(root: PathLike, transform: Optional[Callable] = None) -> LabeledImages:
    """``root/<class>/<image>``: labels by sorted folder name, class names with ``_`` read as a space."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root))
    classnames = [c.replace("_", " ") for c in folder.classes]
    return LabeledImages(folder.samples, classnames, transform)


def _read_table(path: PathLike, delimiter: Optional[str], columns: Sequence[str]) -> List[Dict[str, str]]:
    """Rows of a CSV/TSV with a header line; tab for ``.tsv``, comma otherwise, unless given."""
    path = Path(path)
    delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: header {reader.fieldnames} lacks column(s) {missing}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _resolve(base: Path, rel: str) -> Path:
    return Path(rel) if os.path.isabs(rel) else base / rel


def labels_table(path: PathLike, transform: Optional[Callable] = None, classnames: Optional[List[str]] = None,
                 delimiter: Optional[str] = None, path_column: str = "filepath",
                 label_column: str = "label") -> LabeledImages:
    """CSV/TSV of ``filepath,label`` (paths relative to the table's folder).

    Labels are class indices when every label is an integer (then pass ``classnames`` for zero-shot),
    otherwise class names, numbered in sorted order unless ``classnames`` fixes the order.
    """
    rows = _read_table(path, delimiter, (path_column, label_column))
    base = Path(path).parent
    raw = [r[label_column].strip() for r in rows]
    if all(v.lstrip("-").isdigit() for v in raw):
        labels = [int(v) for v in raw]
        if classnames is not None and not all(0 <= v < len(classnames) for v in labels):
            raise ValueError(f"{path}: labels outside [0, {len(classnames)}) for the given class names")
    else:
        classnames = classnames or sorted(set(raw))
        index = {c: i for i, c in enumerate(classnames)}
        unknown = sorted(set(raw) - set(index))
        if unknown:
            raise ValueError(f"{path}: labels not among the class names: {unknown[:5]}")
        labels = [index[v] for v in raw]
    samples = [(_resolve(base, r[path_column]), y) for r, y in zip(rows, labels)]
    return LabeledImages(samples, classnames, transform)


def captions_table(path: PathLike, transform: Optional[Callable] = None, delimiter: Optional[str] = None,
                   path_column: str = "filepath", caption_column: str = "caption") -> CaptionedImages:
    """CSV/TSV of ``filepath<TAB>caption``, one row per caption, grouped by image in first-seen order."""
    rows = _read_table(path, delimiter, (path_column, caption_column))
    grouped: Dict[str, List[str]] = {}
    for r in rows:
        grouped.setdefault(r[path_column], []).append(r[caption_column])
    base = Path(path).parent
    return CaptionedImages([(_resolve(base, p), caps) for p, caps in grouped.items()], transform)


def coco_captions(annotation_file: PathLike, image_root: Optional[PathLike] = None,
                  transform: Optional[Callable] = None) -> CaptionedImages:
    """COCO captions JSON; images without captions are dropped, order follows ``images``.

    ``image_root`` defaults to the JSON's folder, else its ``val2017``-style sibling named by the file.
    """
    annotation_file = Path(annotation_file)
    with open(annotation_file, encoding="utf-8") as f:
        coco = json.load(f)
    caps: Dict[int, List[str]] = {}
    for ann in coco["annotations"]:
        caps.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    root = Path(image_root) if image_root is not None else _coco_image_root(annotation_file)
    items = [(root / img["file_name"], caps[img["id"]]) for img in coco["images"] if img["id"] in caps]
    if not items:
        raise ValueError(f"{annotation_file}: no image has a caption")
    return CaptionedImages(items, transform)


def _coco_image_root(annotation_file: Path) -> Path:
    """COCO's own layout names the image folder in the file name: captions_val2017.json → val2017/."""
    split = annotation_file.stem.rsplit("_", 1)[-1]
    candidate = annotation_file.parent / split
    return candidate if candidate.is_dir() else annotation_file.parent


def is_wds_root(root: PathLike, split: str = "test") -> bool:
    return (Path(root) / split / "nshards.txt").is_file()


def wds_dataset(root: PathLike, transform: Optional[Callable] = None, split: str = "test"):
    """WebDataset shards in clip_benchmark's layout, read with the ``webdataset`` library.

    ``root/<split>/nshards.txt`` and ``root/<split>/{0..n-1}.tar``; ``root/dataset_type.txt``
    ("retrieval" → samples with ``.txt`` captions, one per line; otherwise ``.cls`` labels) and, for
    classification, ``root/classnames.txt`` and ``root/zeroshot_classification_templates.txt``.
    The result is an IterableDataset with ``classnames``, ``templates`` and ``retrieval`` attributes.
    """
    try:
        import webdataset as wds
    except ImportError as err:
        raise ImportError("WebDataset evaluation needs `pip install webdataset` (clipforge[wds])") from err
    root = Path(root)
    nshards = int((root / split / "nshards.txt").read_text().strip())
    shards = [str(root / split / f"{i}.tar") for i in range(nshards)]
    kind_file = root / "dataset_type.txt"
    retrieval = kind_file.is_file() and kind_file.read_text().strip().lower() == "retrieval"
    transform = transform or (lambda x: x)
    ds = wds.WebDataset(shards, shardshuffle=False, nodesplitter=lambda src: src, empty_check=False).decode("pil")
    if retrieval:
        ds = ds.to_tuple("webp;png;jpg;jpeg", "txt").map_tuple(transform, str.splitlines)
    else:
        ds = ds.to_tuple("webp;png;jpg;jpeg", "cls").map_tuple(transform, int)
    ds.retrieval = retrieval
    ds.classnames = _read_lines(root / "classnames.txt")
    ds.templates = _read_lines(root / "zeroshot_classification_templates.txt")
    return ds


def _read_lines(path: Path) -> Optional[List[str]]:
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def open_eval_dataset(path: PathLike, task: str, transform: Optional[Callable] = None, split: str = "test",
                      image_root: Optional[PathLike] = None, classnames: Optional[List[str]] = None):
    """Open ``path`` for ``task`` by one fixed rule table (no guessing):

    =====================  =====================================  ===========================
    path                   classification / linear_probe          zeroshot_retrieval
    =====================  =====================================  ===========================
    dir with split/nshards WebDataset (clip_benchmark layout)     WebDataset
    other dir              ImageFolder (``split`` subfolder if    —
                           present)
    ``.csv`` / ``.tsv``    ``filepath,label`` table               ``filepath,caption`` table
    ``.json``              —                                      COCO captions
    =====================  =====================================  ===========================
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    path = Path(path)
    retrieval = task == "zeroshot_retrieval"
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    if path.is_dir() and is_wds_root(path, split):
        ds = wds_dataset(path, transform, split)
        if ds.retrieval != retrieval:
            raise ValueError(f"{path} is a {'retrieval' if ds.retrieval else 'classification'} set; task is {task}")
        return ds
    suffix = path.suffix.lower()
    if retrieval and suffix in (".csv", ".tsv"):
        return captions_table(path, transform)
    if retrieval and suffix == ".json":
        return coco_captions(path, image_root, transform)
    if not retrieval and suffix in (".csv", ".tsv"):
        return labels_table(path, transform, classnames)
    if not retrieval and path.is_dir():
        return image_folder(path / split if (path / split).is_dir() else path, transform)
    raise ValueError(f"cannot open {path} for {task}: see clipforge.evaluate.datasets.open_eval_dataset")
