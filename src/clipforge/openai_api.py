"""OpenAI's ``clip`` package API on clipforge: ``available_models``, ``load`` and ``tokenize``.

Code written for OpenAI's package (its README, tutorials, notebooks) runs unchanged with
``import clipforge as clip``: the same nine model names, the same files (OpenAI's TorchScript
releases, fetched from the same URLs into the same ``~/.cache/clip`` and checked against the same
sha256), and a model with OpenAI's surface: ``model(image, text)`` returns ``(logits_per_image,
logits_per_text)``, ``encode_image``/``encode_text`` return unnormalised features, and
``visual.input_resolution``, ``context_length``, ``vocab_size``, ``dtype`` and ``logit_scale`` are there.
The text tower's parts sit at the root as in OpenAI's class (``token_embedding``,
``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``), so prompt-learning code
(CoOp and its successors) that builds its own text encoder from them runs unchanged; ``transformer``
takes OpenAI's sequence-first [L, N, D] tokens.

Where clipforge does not do what OpenAI's ``load`` does, it says so here rather than pretend:

* ``jit=False`` builds clipforge's own modules. On a device other than the CPU every weight is fp16
  (OpenAI keeps LayerNorm, embeddings and the logit scale in fp32 and casts them in the forward
  pass); outputs are fp16 in both. On the CPU an fp32 state dict keeps its fp32 weights, where
  OpenAI's ``build_model`` first rounds Linear/Conv weights through fp16 (OpenAI's own files are
  fp16, so for them the two agree).
* ``jit=True`` returns OpenAI's TorchScript archive itself, with the device (and, on the CPU, the
  dtype) constants in its graphs patched as OpenAI's ``load`` does. A file that is not a TorchScript
  archive is loaded as a state dict with OpenAI's own warning (what OpenAI does).
* A local file must be in OpenAI's layout (a TorchScript archive, or a state dict with the text
  tower at the root), as OpenAI's ``load`` requires; its weights are taken to use QuickGELU, as
  OpenAI's model class always does. OpenCLIP checkpoints go through ``create_model_and_transforms``.
* Only the root ``transformer`` is sequence-first. ``visual.transformer`` and every ``resblocks[i]``
  are clipforge's batch-first modules ([N, L, D]); code that feeds them OpenAI's [L, N, D] gets wrong
  numbers without an error, so ViT-internal hacks written for OpenAI's class need a transpose.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import regex
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints.io import CheckpointError, is_torchscript_archive, read_checkpoint
from .checkpoints.load import build_with_weights, unwrap_state_dict
from .checkpoints.openai import file_layout, infer_config
from .config import PreprocessConfig
from .models.clip import CLIP, text_keys_from_root, text_keys_to_root
from .models.layers import Transformer

__all__ = ["OPENAI_MODEL_NAMES", "OpenAICLIP", "SeqFirstTransformer", "available_models", "load", "tokenize"]

# OpenAI's names (``clip.available_models()``, in its order) -> the clipforge architecture whose
# ``openai`` tag (clipforge.pretrained) holds that release's URL and sha256.
OPENAI_MODEL_NAMES: Dict[str, str] = {
    "RN50": "RN50",
    "RN101": "RN101",
    "RN50x4": "RN50x4",
    "RN50x16": "RN50x16",
    "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}
OPENAI_CACHE = "~/.cache/clip"  # OpenAI's default download_root
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"  # OpenAI's spelling of the special tokens
# OpenAI's word pattern: its special tokens, then the same split as clipforge's BPE tokenizer.
_OPENAI_WORDS = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                              r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def available_models() -> List[str]:
    """The names of OpenAI's CLIP releases, as ``clip.available_models()``."""
    return list(OPENAI_MODEL_NAMES)


class SeqFirstTransformer(nn.Module):
    """OpenAI's ``model.transformer``: a text tower's blocks on sequence-first [L, N, D] tokens, causal.

    clipforge's :class:`~clipforge.models.layers.Transformer` is batch-first; OpenAI's takes [L, N, D]
    and code written for it permutes before and after the call. ``resblocks`` are the tower's own
    modules, so training or freezing them here trains or freezes the model.
    """

    def __init__(self, stack: Transformer, causal: bool):
        super().__init__()
        self.width, self.layers, self.causal = stack.width, stack.layers, causal
        self.resblocks = stack.resblocks
        object.__setattr__(self, "_stack", stack)  # run by the stack (checkpointing), not registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[L, N, width] -> [L, N, width]."""
        return self._stack(x.transpose(0, 1), is_causal=self.causal).transpose(0, 1)


class OpenAICLIP(nn.Module):
    """A clipforge CLIP's towers behind OpenAI's ``clip.model.CLIP`` interface.

    Not a :class:`~clipforge.models.clip.CLIP` (whose ``forward`` returns a dict of normalised
    features): this one's ``forward`` returns OpenAI's logits, so it is kept apart from the
    models clipforge's own trainers and evaluators take. The state dict has OpenAI's keys, so
    ``torch.save(model.state_dict(), f)`` gives a file OpenAI's ``clip.load`` reads.
    """

    def __init__(self, model: CLIP):
        super().__init__()
        if model.cfg.custom_text or model.cfg.text_cfg.kind != "transformer" or model.logit_bias is not None:
            raise ValueError("OpenAI's model interface needs OpenAI's layout: a transformer text tower "
                             "with its keys at the root and no logit bias")
        self.cfg = model.cfg
        self.visual = model.visual
        self.text = model.text
        self.logit_scale = model.logit_scale
        self.visual.input_resolution = model.cfg.vision_cfg.image_size  # OpenAI's name for the image size
        # not a registered child: its blocks are already in the state dict under ``text.`` (-> the root)
        object.__setattr__(self, "_seq_first", SeqFirstTransformer(self.text.transformer, model.cfg.text_cfg.causal))
        self._register_state_dict_hook(_keys_to_root)
        self._register_load_state_dict_pre_hook(_keys_from_root, with_module=True)

    @property
    def context_length(self) -> int:
        return self.cfg.text_cfg.context_length

    @property
    def vocab_size(self) -> int:
        return self.cfg.text_cfg.vocab_size

    @property
    def transformer(self) -> SeqFirstTransformer:
        """The text blocks on OpenAI's sequence-first [L, N, D] tokens."""
        return self._seq_first

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text.token_embedding

    @property
    def positional_embedding(self) -> nn.Parameter:
        return self.text.positional_embedding

    @property
    def ln_final(self) -> nn.Module:
        return self.text.ln_final

    @property
    def text_projection(self) -> nn.Parameter:
        return self.text.text_projection

    @property
    def dtype(self) -> torch.dtype:
        """The dtype images are cast to (OpenAI: that of ``visual.conv1``)."""
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, embed_dim] unnormalised image features; ``image`` is cast to the model's dtype first."""
        features = self.visual(image.type(self.dtype))
        return features[0] if isinstance(features, tuple) else features

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[B, embed_dim] unnormalised text features of token ids [B, context_length]."""
        features = self.text(text)
        return features[0] if isinstance(features, tuple) else features

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image [B_image, B_text], logits_per_text [B_text, B_image]), as OpenAI's CLIP."""
        image_features = F.normalize(self.encode_image(image), dim=1)
        text_features = F.normalize(self.encode_text(text), dim=1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def _keys_to_root(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    new = text_keys_to_root(state_dict, prefix)
    state_dict.clear()
    state_dict.update(new)


def _keys_from_root(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    new = text_keys_from_root(state_dict, prefix)
    state_dict.clear()
    state_dict.update(new)


def _openai_transform(n_px: int) -> Callable:
    """OpenAI's ``_transform``: bicubic resize of the short side, centre crop, RGB, OpenAI's mean/std.

    clipforge's eval transform for the default PreprocessConfig does the same operations in the same
    order (the test compares the tensors with OpenAI's).
    """
    from .transforms import image_transform

    return image_transform(PreprocessConfig(image_size=n_px), is_train=False)


def _model_file(name: str, download_root: Optional[Union[str, Path]]) -> Path:
    """The local file for an OpenAI model name (downloaded and verified) or a path."""
    if name in OPENAI_MODEL_NAMES:
        from .pretrained import fetch_url, get_pretrained_cfg

        release = get_pretrained_cfg(OPENAI_MODEL_NAMES[name], "openai").url
        return fetch_url(release.url, release.sha256, Path(download_root or OPENAI_CACHE).expanduser())
    if os.path.isfile(name):
        return Path(name)
    raise RuntimeError(f"Model {name} not found; available models = {available_models()}")


def load(name: str, device: Union[str, torch.device] = "cuda" if torch.cuda.is_available() else "cpu",
         jit: bool = False, download_root: Optional[str] = None) -> Tuple[nn.Module, Callable]:
    """(model, preprocess) as OpenAI's ``clip.load``.

    Args:
        name: one of :func:`available_models` (its TorchScript release is downloaded into
            ``download_root``, default ``~/.cache/clip``, and verified), or the path of a file in
            OpenAI's layout (TorchScript archive or state dict).
        device: where the model goes; fp32 on the CPU, fp16 elsewhere (as OpenAI).
        jit: return OpenAI's TorchScript module itself instead of clipforge's modules.
        download_root: the download folder.

    Returns:
        The model in eval mode (:class:`OpenAICLIP`, or TorchScript with ``jit=True``) and the
        transform from a PIL image to the model's input tensor.
    """
    path = _model_file(name, download_root)
    if jit:
        if is_torchscript_archive(path):
            return _load_torchscript(path, device)
        warnings.warn(f"File {path} is not a JIT archive. Loading as a state dict instead")
    if file_layout(path) != "openai":
        raise CheckpointError(f"{path}: not in OpenAI's layout (a TorchScript archive, or a state dict with the "
                              f"text tower at the root), which OpenAI's clip.load reads; load OpenCLIP checkpoints "
                              f"with clipforge.create_model_and_transforms")
    state_dict = unwrap_state_dict(read_checkpoint(path))
    cfg = infer_config(state_dict, quick_gelu=True, source=str(path))  # OpenAI's model class is QuickGELU
    model = OpenAICLIP(build_with_weights(cfg, state_dict, str(path))).to(device)
    if str(device) != "cpu":
        model.half()
    return model.eval(), _openai_transform(model.visual.input_resolution)


# ---- jit=True: OpenAI's TorchScript archive, patched for the device as OpenAI's load does -----------


def _script_graphs(module: torch.jit.ScriptModule) -> List[torch.Graph]:
    """The graphs of a scripted (sub)module: ``forward``'s and, for traced modules, ``forward1``'s."""
    try:
        graphs = [module.graph] if hasattr(module, "graph") else []
    except RuntimeError:  # a submodule without a forward
        graphs = []
    if hasattr(module, "forward1"):
        graphs.append(module.forward1.graph)
    return graphs


def _patch_graphs(model: torch.jit.ScriptModule, patch: Callable[[torch.Graph], None]) -> None:
    for module in [*model.modules(), model.encode_image, model.encode_text]:
        for graph in _script_graphs(module):
            patch(graph)


def _constant(node: torch.Node) -> object:
    """The value of a ``prim::Constant`` node (None for other nodes and valueless constants)."""
    if node.kind() != "prim::Constant" or not node.hasAttribute("value"):
        return None
    return node.output().toIValue()


def _load_torchscript(path: Path, device: Union[str, torch.device]) -> Tuple[torch.jit.ScriptModule, Callable]:
    """OpenAI's archives were traced on CUDA in fp16: their graphs hold "cuda" device constants and
    casts to fp16 (dtype code 5). These are rewritten to ``device`` and, on the CPU, to fp32, as
    OpenAI's ``load`` does, by copying the constant of a tiny trace made for the target. (OpenAI's own
    code reads constants as ``node["value"]``, which torch 2 no longer offers.)"""
    with warnings.catch_warnings():  # torch.jit's deprecation notices: TorchScript is what is asked for
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(path), map_location=device).eval()
        device_trace = torch.jit.trace(lambda: torch.ones([]).to(torch.device(device)), example_inputs=[])
        float_trace = torch.jit.trace(lambda: torch.ones([]).float(), example_inputs=[])
    device_node = [n for n in device_trace.graph.findAllNodes("prim::Constant") if "Device" in repr(n)][-1]

    def patch_device(graph: torch.Graph) -> None:
        for node in graph.findAllNodes("prim::Constant"):
            if isinstance(_constant(node), torch.device) and str(_constant(node)).startswith("cuda"):
                node.copyAttributes(device_node)

    _patch_graphs(model, patch_device)
    if str(device) == "cpu":
        float_node = list(float_trace.graph.findNode("aten::to").inputs())[1].node()
        fp16 = 5  # TorchScript's code for torch.float16

        def patch_float(graph: torch.Graph) -> None:
            for node in graph.findAllNodes("aten::to"):
                inputs = list(node.inputs())
                for i in (1, 2):  # the dtype is aten::to's second or third argument
                    value = _constant(inputs[i].node()) if i < len(inputs) else None
                    if type(value) is int and value == fp16:
                        inputs[i].node().copyAttributes(float_node)

        _patch_graphs(model, patch_float)
        model.float()
    return model, _openai_transform(int(model.input_resolution.item()))


# ---- tokenize ------------------------------------------------------------------------------------


def _openai_ids(text: str) -> List[int]:
    """OpenAI's ``SimpleTokenizer.encode``: clipforge's BPE, with OpenAI's special-token spelling.

    Text without '<' cannot hold a special token in either spelling, so clipforge's (cached) encoder
    gives OpenAI's ids directly; other text is split with OpenAI's word pattern, so a literal
    ``<|endoftext|>`` is the special id (as in OpenAI's) and ``<end_of_text>`` is plain text.
    """
    from .tokenizer import default_tokenizer
    from .tokenizer.bpe import get_clean_fn

    tokenizer = default_tokenizer()
    cleaned = get_clean_fn("lower")(text)
    if "<" not in cleaned:
        return tokenizer.encode(text)
    specials = {_SOT: tokenizer.sot_token_id, _EOT: tokenizer.eot_token_id}
    return [i for word in _OPENAI_WORDS.findall(cleaned)
            for i in ((specials[word],) if word in specials else tokenizer._word_ids(word))]


def tokenize(texts: Union[str, List[str]], context_length: int = 77, truncate: bool = False) -> torch.IntTensor:
    """OpenAI's ``clip.tokenize``: int32 [len(texts), context_length] of [SOT, ids..., EOT, 0...].

    A text longer than ``context_length`` raises RuntimeError, unless ``truncate``, where it is cut
    and its last token replaced by EOT.
    """
    from .tokenizer import default_tokenizer

    if isinstance(texts, str):
        texts = [texts]
    tokenizer = default_tokenizer()
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    result = torch.zeros(len(texts), context_length, dtype=torch.int)
    for row, text in enumerate(texts):
        tokens = [sot, *_openai_ids(text), eot]
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[row, :len(tokens)] = torch.tensor(tokens)
    return result
