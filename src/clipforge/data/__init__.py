"""Datasets and loaders for CLIP training and evaluation.

Nothing here imports the tokenizer or builds a transform: callers pass ``transform`` (PIL -> Tensor)
and ``tokenize`` (list[str] -> LongTensor[N, L]) in, which keeps the data code testable alone.
Images are opened by clipforge's one opener, :func:`clipforge.transforms.load_image`.
"""
from .captions import (CaptionDataset, CaptionGroups, CaptionRecord, ImageListDataset, TableRow, coco_dataset,
                       csv_dataset, jsonl_dataset, read_caption_file, read_coco_records, read_csv_records,
                       read_jsonl_records, read_table, table_separator)
from .loader import DataConfig, TrainLoader, build_dataset, build_eval_loader, build_train_loader, caption_groups
from .robust import Batch, BrokenSample, DataError, SkipStats, collate_skipping
from .sampler import ResumableDistributedSampler
from .shards import ShardWriteResult, write_shards
from .synthetic import (ZEROSHOT_TEMPLATES, RandomCaptionDataset, ShapesConfig, ShapesData, ShapesDataset,
                        ShapesSplits, generate_shapes, make_shapes_splits, render_shape)
from .webdataset import WdsCaptionStream, expand_urls, read_shard_sizes

__all__ = [
    "CaptionDataset", "CaptionGroups", "CaptionRecord", "ImageListDataset", "TableRow", "coco_dataset",
    "csv_dataset", "jsonl_dataset", "read_caption_file", "read_coco_records", "read_csv_records",
    "read_jsonl_records", "read_table", "table_separator",
    "DataConfig", "TrainLoader", "build_dataset", "build_eval_loader", "build_train_loader", "caption_groups",
    "Batch", "BrokenSample", "DataError", "SkipStats", "collate_skipping",
    "ResumableDistributedSampler", "ShardWriteResult", "write_shards",
    "ZEROSHOT_TEMPLATES", "RandomCaptionDataset", "ShapesConfig", "ShapesData", "ShapesDataset",
    "ShapesSplits", "generate_shapes", "make_shapes_splits", "render_shape",
    "WdsCaptionStream", "expand_urls", "read_shard_sizes",
]
