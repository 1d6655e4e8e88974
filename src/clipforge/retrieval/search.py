"""Search an indexed collection by text, image, embedding or an indexed row: top-k hits with metadata.

:class:`Searcher` opens the indexes of ``OUT/index`` memory-mapped (:func:`~.index.read_index`), so
opening a million-row collection costs no copy of its index; the metadata of the indexed parts is
read once into one Arrow table. The CLIP model (``embed_info.json``'s unless given) is loaded on the
first text or image query, under a lock, so a server's threads share it. Scores are cosine
similarities (inner products of L2-normalised vectors). Bad input raises ``ValueError`` with a
message for the user; an id out of range raises ``IndexError``.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .index import current_index_folder, index_file, normalized, read_index, read_index_info
from .layout import CAPTION, IMAGE_PATH, MODALITIES, PathLike, embedding_path, metadata_path, read_info

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


@dataclass
class Hit:
    id: int  # global row id
    score: float  # cosine similarity (nan for a metadata look-up)
    image_path: Optional[str]  # as stored in metadata (absolute or as given)
    caption: Optional[str]
    extra: Dict[str, Any] = field(default_factory=dict)  # other metadata columns


class Searcher:
    """The indexes, metadata and (lazily) the model of one embedding folder."""

    def __init__(self, folder: PathLike, model_name: Optional[str] = None, pretrained: Optional[str] = None,
                 device: str = "cpu", mmap: bool = True):
        self.folder = Path(folder)
        embed = read_info(self.folder)
        index_folder = current_index_folder(self.folder)
        info = read_index_info(self.folder)
        self.info: Dict[str, dict] = {m: info[m] for m in MODALITIES if m in info}
        if not self.info:
            raise FileNotFoundError(f"{folder}: the index folder lists no index; run `clipforge index {folder}`")
        self.indexes = {m: read_index(index_file(index_folder, m), mmap=mmap) for m in self.info}
        for m, index in self.indexes.items():
            if index.ntotal != self.info[m]["rows"]:
                raise ValueError(f"{index_file(index_folder, m)}: {index.ntotal} rows, index_info.json says "
                                 f"{self.info[m]['rows']}; rebuild with `clipforge index {folder}`")
        self.modalities: Tuple[str, ...] = tuple(self.indexes)
        self.model_name = model_name or embed.model
        same_model = model_name is None or model_name == embed.model
        self.pretrained = pretrained or (embed.pretrained if same_model else None)
        self.device = device
        self._model = None
        self._lock = threading.Lock()
        self._parts = self._metadata_parts()
        self.metadata = self._read_metadata()

    # ---- metadata --------------------------------------------------------------------------------
    def _metadata_parts(self) -> List[Tuple[int, int]]:
        """(part, rows) of the rows the indexes hold; every modality's parts are a prefix of these."""
        lists = {m: list(zip(e["parts"], e["part_rows"])) for m, e in self.info.items()}
        longest = max(lists.values(), key=len)
        for m, parts in lists.items():
            if parts != longest[:len(parts)]:
                raise ValueError(f"{self.folder}: the {m} index was built from other parts than the others; "
                                 f"rebuild with `clipforge index {self.folder}`")
        return longest

    def _read_metadata(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for part, rows in self._parts:
            table = pq.read_table(metadata_path(self.folder, part))
            if table.num_rows != rows:
                raise ValueError(f"{metadata_path(self.folder, part)}: {table.num_rows} rows but the index holds "
                                 f"{rows} from that part; rebuild with `clipforge index {self.folder}`")
            tables.append(table)
        return pa.concat_tables(tables, promote_options="default").combine_chunks()

    def size(self, modality: str = "image") -> int:
        """Rows in ``modality``'s index."""
        return int(self._index(modality).ntotal)

    def hit(self, id: int) -> Hit:
        """The metadata of row ``id`` (score nan); IndexError when there is no such row."""
        return self._hits([int(self._check_id(id))], [math.nan])[0]

    def image_file(self, id: int) -> Optional[Path]:
        """The local image file of row ``id``; None when its path is not an existing absolute file."""
        path = self.hit(id).image_path
        if not path or "://" in path or path.startswith("pipe:"):
            return None
        p = Path(path)
        return p if p.is_absolute() and p.is_file() else None

    def _check_id(self, id: int) -> int:
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)):
            raise ValueError(f"id must be an integer, got {id!r}")
        if not 0 <= id < self.metadata.num_rows:
            raise IndexError(f"id {id} out of range: the collection has rows 0..{self.metadata.num_rows - 1}")
        return int(id)

    def _hits(self, ids: List[int], scores: List[float]) -> List[Hit]:
        rows = self.metadata.take(ids).to_pylist()
        return [Hit(id=i, score=float(s), image_path=row.pop(IMAGE_PATH, None), caption=row.pop(CAPTION, None),
                    extra=row) for i, s, row in zip(ids, scores, rows)]

    # ---- queries ---------------------------------------------------------------------------------
    def _index(self, modality: str):
        if modality not in self.indexes:
            raise ValueError(f"unknown modality {modality!r}: this collection has "
                             f"{' and '.join(self.modalities)} indexes")
        return self.indexes[modality]

    def search_embedding(self, vector: np.ndarray, k: int = 20, modality: str = "image") -> List[Hit]:
        """The ``k`` rows nearest to ``vector`` (normalised here) in ``modality``'s index."""
        index = self._index(modality)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= index.ntotal:
            raise ValueError(f"k must be an integer from 1 to {index.ntotal}, got {k!r}")
        try:
            v = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError("the embedding must be a list of numbers") from None
        if v.ndim == 2 and v.shape[0] == 1:
            v = v[0]
        if v.shape != (index.d,):
            raise ValueError(f"the embedding must have {index.d} numbers, got shape {tuple(v.shape)}")
        if not np.all(np.isfinite(v)) or not np.any(v):
            raise ValueError("the embedding must be finite and not all zero")
        scores, ids = index.search(normalized(v[None]), int(k))
        keep = ids[0] >= 0  # an approximate index can return fewer than k
        return self._hits(ids[0][keep].tolist(), scores[0][keep].tolist())

    def search_id(self, id: int, k: int = 20, modality: str = "image") -> List[Hit]:
        """Search by row ``id``'s own ``modality`` vector (read exactly from its part, not the index)."""
        self._index(modality)
        id = self._check_id(id)
        starts = np.cumsum([0] + [n for _, n in self._parts])
        i = int(np.searchsorted(starts, id, side="right") - 1)
        if id >= self.size(modality):
            raise IndexError(f"id {id} is not in the {modality} index ({self.size(modality)} rows)")
        vector = np.load(embedding_path(self.folder, modality, self._parts[i][0]), mmap_mode="r")[id - starts[i]]
        return self.search_embedding(vector, k, modality)

    def search_text(self, query: str, k: int = 20, modality: str = "image") -> List[Hit]:
        """Search ``modality``'s index with the model's embedding of the text ``query``."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("the text query is empty")
        self._index(modality)
        from ..evaluate.features import text_features

        model, _, tokenizer = self._load_model()
        return self.search_embedding(text_features(model, tokenizer, [query.strip()], self.device)[0].numpy(),
                                     k, modality)

    def search_image(self, image: "Image.Image", k: int = 20, modality: str = "image") -> List[Hit]:
        """Search ``modality``'s index with the model's embedding of a PIL image."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise ValueError(f"expected a PIL image, got {type(image).__name__}")
        self._index(modality)
        from ..evaluate.features import iter_image_features
        from ..transforms import rgb_for

        model, transform, _ = self._load_model()
        batch = transform(rgb_for(transform, image))[None]  # [1, 3, H, W]
        (features, _), = iter_image_features(model, [(batch, None)], self.device, use_tqdm=False)
        return self.search_embedding(features[0].numpy(), k, modality)

    def _load_model(self):
        """(model, eval transform, tokenizer), built on first use."""
        with self._lock:
            if self._model is None:
                from ..factory import create_model_and_transforms, get_tokenizer

                model, _, transform = create_model_and_transforms(self.model_name, pretrained=self.pretrained,
                                                                   device=self.device)
                model.eval()
                dim = model.cfg.embed_dim
                for m, index in self.indexes.items():
                    if index.d != dim:
                        raise ValueError(f"model {self.model_name!r} makes {dim}-d embeddings but the {m} index "
                                         f"holds {index.d}-d vectors; pass the model the folder was embedded with")
                tokenizer = get_tokenizer(self.model_name, context_length=model.cfg.text_cfg.context_length)
                self._model = (model, transform, tokenizer)
            return self._model


ImageInput = Union["Image.Image", str, Path, bytes]


def search(folder: PathLike, text: Optional[str] = None, image: Optional[ImageInput] = None, k: int = 20,
           modality: str = "image", **kw) -> List[Hit]:
    """One query against ``folder``: ``text`` or ``image`` (a PIL image, a file or its bytes), not both.

    ``kw`` goes to :class:`Searcher` (``model_name``, ``pretrained``, ``device``, ``mmap``).
    """
    if (text is None) == (image is None):
        raise ValueError("give exactly one of a text query or an image")
    searcher = Searcher(folder, **kw)
    if text is not None:
        return searcher.search_text(text, k, modality)
    from PIL import Image

    from ..transforms import load_image

    if not isinstance(image, Image.Image):
        image = load_image(image, convert_rgb=False)  # search_image converts as its transform needs
    return searcher.search_image(image, k, modality)


__all__ = ["Hit", "Searcher", "search"]
