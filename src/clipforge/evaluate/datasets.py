"""Evaluation datasets: labelled images for classification, images with several captions for retrieval.

Built on ``clipforge.data``'s readers and image datasets (one CSV/COCO reader, one image opener), with
what evaluation adds: a fixed order, every caption of an image together, and class names/templates
travelling with the data.
Classification items are ``(image, label)``; retrieval items are ``(image, [captions])`` and need
``captions_collate`` in the DataLoader.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from torch.utils.data import default_collate

from ..data.captions import (CaptionGroups, ImageListDataset, read_coco_records, read_csv_records, read_table,
                             resolve_path)
from ..transforms import load_image_for

PathLike = Union[str, Path]
TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
SPLIT_NAMES = ("train", "val", "validation", "test")  # subfolders read as splits of an image folder


class LabeledImages(ImageListDataset):
    """``(transform(image), label)`` from ``(path, label)`` pairs; carries ``classnames`` and ``templates``."""

    # The (path, label) pairs; assigning a list selects other samples (as with torchvision's ImageFolder).
    samples = property(ImageListDataset._pairs, ImageListDataset._set_pairs)

    def __init__(self, samples: Sequence[Tuple[PathLike, int]], classnames: Optional[List[str]],
                 transform: Optional[Callable] = None, templates: Optional[List[str]] = None):
        samples = list(samples)
        super().__init__([p for p, _ in samples], transform, [y for _, y in samples])
        self.classnames = classnames
        self.templates = templates


class CaptionedImages(ImageListDataset):
    """``(transform(image), [captions])`` from ``(path, captions)`` pairs, in the given image order."""

    items = property(ImageListDataset._pairs, ImageListDataset._set_pairs)  # the (path, captions) pairs

    def __init__(self, items: Sequence[Tuple[PathLike, List[str]]], transform: Optional[Callable] = None):
        items = list(items)
        super().__init__([p for p, _ in items], transform, [list(caps) for _, caps in items])
        self.classnames = self.templates = None

    @classmethod
    def from_groups(cls, groups: CaptionGroups, transform: Optional[Callable] = None) -> "CaptionedImages":
        return cls(list(zip(groups.image_paths, groups.captions)), transform)


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


def labels_table(path: PathLike, transform: Optional[Callable] = None, classnames: Optional[List[str]] = None,
                 sep: Optional[str] = None, path_column: str = "filepath",
                 label_column: str = "label") -> LabeledImages:
    """CSV/TSV of ``filepath,label`` (paths relative to the table's folder; separator by
    :func:`clipforge.data.table_separator`).

    Labels are class indices when every label is an integer (then pass ``classnames`` for zero-shot),
    otherwise class names, numbered in sorted order unless ``classnames`` fixes the order.
    """
    rows = [row.values for row in read_table(path, (path_column, label_column), sep)]
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
    samples = [(resolve_path(base, r[path_column]), y) for r, y in zip(rows, labels)]
    return LabeledImages(samples, classnames, transform)


def captions_table(path: PathLike, transform: Optional[Callable] = None, sep: Optional[str] = None,
                   path_column: str = "filepath", caption_column: str = "caption") -> CaptionedImages:
    """CSV/TSV of ``filepath<TAB>caption``, one row per caption, grouped by image in first-seen order."""
    records = read_csv_records(path, path_column, caption_column, sep)
    return CaptionedImages.from_groups(CaptionGroups.from_records(records), transform)


def coco_captions(annotation_file: PathLike, image_root: Optional[PathLike] = None,
                  transform: Optional[Callable] = None) -> CaptionedImages:
    """COCO captions JSON, grouped by image in first-caption order; images without captions are dropped.

    ``image_root`` defaults to the folder named by the file (``captions_val2017.json`` → ``val2017/``
    beside it or beside its folder), else the JSON's folder; see :func:`clipforge.data.read_coco_records`.
    """
    groups = CaptionGroups.from_records(read_coco_records(annotation_file, image_root))
    if not len(groups):
        raise ValueError(f"{annotation_file}: no image has a caption")
    return CaptionedImages.from_groups(groups, transform)


def is_wds_root(root: PathLike, split: str = "test") -> bool:
    return (Path(root) / split / "nshards.txt").is_file()


def wds_dataset(root: PathLike, transform: Optional[Callable] = None, split: str = "test"):
    """WebDataset shards in clip_benchmark's layout, read with the ``webdataset`` library.

    ``root/<split>/nshards.txt`` and ``root/<split>/{0..n-1}.tar``; ``root/dataset_type.txt``
    ("retrieval" → samples with ``.txt`` captions, one per line; otherwise ``.cls`` labels) and, for
    classification, ``root/classnames.txt`` and ``root/zeroshot_classification_templates.txt``.
    The result is an IterableDataset with ``classnames``, ``templates`` and ``retrieval`` attributes.
    """
    from ..data.webdataset import optional_import

    wds = optional_import("webdataset", "WebDataset evaluation")
    root = Path(root)
    nshards = int((root / split / "nshards.txt").read_text().strip())
    shards = [str(root / split / f"{i}.tar") for i in range(nshards)]
    kind_file = root / "dataset_type.txt"
    retrieval = kind_file.is_file() and kind_file.read_text().strip().lower() == "retrieval"
    # Raw bytes in, decoded here: images by clipforge's opener, exactly as the other layouts read them.
    ds = wds.WebDataset(shards, shardshuffle=False, nodesplitter=_all_shards, empty_check=False)
    image = functools.partial(_wds_image, transform=transform)
    if retrieval:
        ds = ds.to_tuple("webp;png;jpg;jpeg", "txt").map_tuple(image, _wds_captions)
    else:
        ds = ds.to_tuple("webp;png;jpg;jpeg", "cls").map_tuple(image, _wds_label)
    ds.retrieval = retrieval
    ds.classnames = _read_lines(root / "classnames.txt")
    ds.templates = _read_lines(root / "zeroshot_classification_templates.txt")
    return ds


def _all_shards(urls):
    return urls  # every process reads every shard: evaluation sees the whole set in order


def _wds_image(data: bytes, transform: Optional[Callable] = None):
    image = load_image_for(transform, data)
    return transform(image) if transform is not None else image


def _wds_captions(data: bytes) -> List[str]:
    return data.decode("utf-8").splitlines()


def _wds_label(data: bytes) -> int:
    return int(data.decode("utf-8"))


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
                           present; else the folder itself,
                           unless it has other split folders)
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
    if path.is_dir() and not is_wds_root(path, split) and any(path.glob("*/nshards.txt")):
        found = sorted(p.parent.name for p in path.glob("*/nshards.txt"))
        raise ValueError(f"{path}: WebDataset set without a {split!r} split ({split}/nshards.txt); its splits: {found}")
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
        if (path / split).is_dir():
            return image_folder(path / split, transform)
        splits = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name in SPLIT_NAMES)
        if splits:  # e.g. test/ without train/: the class folders are one level down
            raise ValueError(f"{path}: no {split}/ folder; it has the split folder(s) {splits}")
        return image_folder(path, transform)  # no splits: the folder is the split (see linear_probe's held-out test)
    raise ValueError(f"cannot open {path} for {task}: see clipforge.evaluate.datasets.open_eval_dataset")
