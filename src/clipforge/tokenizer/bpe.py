"""CLIP's byte-level BPE tokenizer, id-for-id identical to OpenAI CLIP and OpenCLIP.

Speed comes from three things the reference does not do: plain-ASCII text skips ftfy (a
provable no-op on it), each word's ids are cached (not its BPE string), and whole texts are
cached so repeated prompts cost one dict lookup.
"""
from __future__ import annotations

import gzip
import html
import string
from functools import lru_cache
from importlib import resources
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import ftfy
import numpy as np
import regex
import torch

DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges: 2 * 256 byte tokens + merges + 2 specials = 49408 ids.
NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"

# Text made only of these characters is left unchanged by ftfy.fix_text (no mojibake, controls,
# wide/curly characters or line-break variants) and by html.unescape (no '&'), so cleaning it
# reduces to whitespace collapsing; the test suite checks this equivalence.
_NEEDS_NO_FIXING = regex.compile(r"[\t\n\x20-\x25\x27-\x7e]*")
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)

TextInput = Union[str, Sequence[str]]


# ----------------------------------------------------------------------------- text cleaning
def basic_clean(text: str) -> str:
    """Repair broken Unicode and (doubly) escaped HTML, as OpenCLIP does before tokenizing."""
    if _NEEDS_NO_FIXING.fullmatch(text) is None:
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace to one space and trim the ends."""
    return " ".join(text.split())


def canonicalize_text(text: str) -> str:
    """big_vision's prompt canonicalisation (SigLIP): '_' to space, no punctuation, lower case."""
    text = text.replace("_", " ").translate(_PUNCTUATION_TABLE).lower()
    return whitespace_clean(text)


def _clean_lower(text: str) -> str:
    return whitespace_clean(basic_clean(text)).lower()


def _clean_whitespace(text: str) -> str:
    return whitespace_clean(basic_clean(text))


def _clean_canonicalize(text: str) -> str:
    return canonicalize_text(basic_clean(text))


CLEAN_FUNCTIONS: Dict[str, Callable[[str], str]] = {
    "lower": _clean_lower,
    "whitespace": _clean_whitespace,
    "canonicalize": _clean_canonicalize,
}


def get_clean_fn(mode: str) -> Callable[[str], str]:
    """The cleaning function OpenCLIP names ``mode``: 'lower', 'whitespace' or 'canonicalize'."""
    try:
        return CLEAN_FUNCTIONS[mode]
    except KeyError:
        raise ValueError(f"unknown clean mode {mode!r}; expected one of {sorted(CLEAN_FUNCTIONS)}") from None


# ----------------------------------------------------------------------------- vocabulary
@lru_cache(maxsize=None)
def byte_to_unicode() -> Dict[int, str]:
    """Map every byte to a visible character so BPE never sees whitespace or control characters.

    Printable Latin-1 bytes stand for themselves; the 68 others are shifted to U+0100 onwards, in
    byte order. The insertion order of this dict is the order of CLIP's first 256 vocabulary ids.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def read_merges(path: Optional[str] = None) -> List[Tuple[str, str]]:
    """The merge list (package copy unless ``path`` is given), cut to CLIP's NUM_MERGES."""
    if path is None:
        with resources.files("clipforge").joinpath("assets", VOCAB_FILE).open("rb") as raw:
            data = gzip.decompress(raw.read())
    else:
        with gzip.open(path, "rb") as f:
            data = f.read()
    lines = data.decode("utf-8").split("\n")[1 : NUM_MERGES + 1]  # line 0 is a version header
    merges = []
    for line in lines:
        first, second = line.split()
        merges.append((first, second))
    return merges


# ----------------------------------------------------------------------------- tokenizer
class CLIPTokenizer:
    """Text to CLIP token ids: ``tokenizer(texts) -> LongTensor [N, context_length]``.

    ``clean`` is OpenCLIP's cleaning mode ('lower' is its default). ``cache_size`` bounds the
    whole-text cache (0 disables it); ``word_cache_size`` bounds the word and chunk caches. A full
    cache is simply emptied: cheaper than LRU bookkeeping on every hit.
    """

    def __init__(
        self,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        clean: str = "lower",
        bpe_path: Optional[str] = None,
        cache_size: int = 1 << 16,
        word_cache_size: int = 1 << 20,
    ) -> None:
        self.context_length = context_length
        self.clean = clean
        self._clean_fn = get_clean_fn(clean)
        self.bpe_path = bpe_path
        self.cache_size = cache_size
        self.word_cache_size = word_cache_size

        self._byte_encoder = byte_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        merges = read_merges(bpe_path)
        symbols = list(self._byte_encoder.values())
        vocab = symbols + [s + _END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [SOT_TOKEN, EOT_TOKEN]
        self._encoder: Dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self._decoder: Dict[int, str] = dict(enumerate(vocab))
        self._ranks: Dict[Tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}

        self.sot_token_id = self._encoder[SOT_TOKEN]
        self.eot_token_id = self._encoder[EOT_TOKEN]
        self.pad_id = 0
        # Same split as the reference, special tokens first (so a literal "<end_of_text>" in the
        # text becomes the special id) and IGNORECASE (which also lets "'ſ" match "'s").
        specials = "|".join(regex.escape(t) for t in (SOT_TOKEN, EOT_TOKEN))
        self._word_pattern = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self._reset_caches()

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    @property
    def all_special_ids(self) -> List[int]:
        return [self.sot_token_id, self.eot_token_id]

    def _reset_caches(self) -> None:
        self._text_cache: Dict[str, Tuple[int, ...]] = {}
        self._chunk_cache: Dict[str, Tuple[int, ...]] = {}
        self._reset_word_cache()

    def __getstate__(self) -> dict:
        # Caches are rebuilt on demand; sending them to DataLoader workers would only cost time.
        state = self.__dict__.copy()
        state["_text_cache"], state["_chunk_cache"], state["_word_cache"] = {}, {}, {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    def _merge(self, word: str) -> List[str]:
        """Apply merges to one byte-encoded word, lowest rank first, until none applies."""
        parts = [*word[:-1], word[-1] + _END_OF_WORD]
        ranks = self._ranks
        while len(parts) > 1:
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: List[str] = []
            i, n = 0, len(parts)
            while i < n:
                if i + 1 < n and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _word_ids(self, word: str) -> Tuple[int, ...]:
        ids = self._word_cache.get(word)
        if ids is None:
            encoded = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
            ids = tuple(self._encoder[p] for p in self._merge(encoded))
            if len(self._word_cache) >= self.word_cache_size:
                self._reset_word_cache()
            self._word_cache[word] = ids
        return ids

    def _reset_word_cache(self) -> None:
        # The specials bypass BPE, as in the reference's pre-seeded cache.
        self._word_cache: Dict[str, Tuple[int, ...]] = {
            SOT_TOKEN: (self.sot_token_id,),
            EOT_TOKEN: (self.eot_token_id,),
        }

    def _chunk_ids(self, chunk: str) -> Tuple[int, ...]:
        """Ids of one space-free piece of cleaned text (a word with its punctuation, usually)."""
        ids = self._chunk_cache.get(chunk)
        if ids is None:
            word_ids = self._word_ids
            ids = tuple(i for w in self._word_pattern.findall(chunk) for i in word_ids(w))
            if len(self._chunk_cache) >= self.word_cache_size:
                self._chunk_cache.clear()
            self._chunk_cache[chunk] = ids
        return ids

    def _encode_ids(self, text: str) -> Tuple[int, ...]:
        ids = self._text_cache.get(text)
        if ids is None:
            # No pattern alternative can match ' ', so splitting on it first gives the same words
            # as splitting the whole text, and lets whole chunks be cached.
            chunk_cache, chunk_ids = self._chunk_cache, self._chunk_ids
            out: List[int] = []
            for chunk in self._clean_fn(text).split(" "):
                cached = chunk_cache.get(chunk)
                out.extend(chunk_ids(chunk) if cached is None else cached)
            ids = tuple(out)
            if self.cache_size > 0:
                if len(self._text_cache) >= self.cache_size:
                    self._text_cache.clear()
                self._text_cache[text] = ids
        return ids

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` after cleaning, without start/end tokens."""
        return list(self._encode_ids(text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids back to text; each word end becomes a space (so the output ends with one).

        With ``skip_special_tokens`` (the default) the text is cut at the first end-of-text token
        and start-of-text tokens are dropped, the rule OpenCLIP's CoCa examples apply to
        ``generate``'s output (``decode(t).split("<end_of_text>")[0].replace("<start_of_text>", "")``),
        so the padding after a caption's end is gone too.
        """
        if hasattr(ids, "tolist"):  # tensors and arrays
            ids = ids.tolist()
        symbols = "".join(self._decoder[int(i)] for i in ids)
        raw = bytes(self._byte_decoder[c] for c in symbols)
        text = raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")
        if skip_special_tokens:
            text = text.split(EOT_TOKEN)[0].replace(SOT_TOKEN, "")
        return text

    def __call__(self, texts: TextInput, context_length: Optional[int] = None) -> torch.Tensor:
        """Rows of [SOT, ids..., EOT, 0...]; too-long texts are cut with EOT kept as last token."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if not length or length < 1:
            raise ValueError(f"context_length must be a positive integer, got {length!r}")
        out = np.zeros((len(texts), length), dtype=np.int64)
        sot, eot = self.sot_token_id, self.eot_token_id
        for row, text in enumerate(texts):
            ids = self._encode_ids(text)
            if len(ids) + 2 <= length:
                out[row, : len(ids) + 2] = (sot, *ids, eot)
            else:  # cut, keeping EOT last
                out[row, :length] = (sot, *ids[: length - 2], eot) if length >= 2 else (eot,)
        return torch.from_numpy(out)
