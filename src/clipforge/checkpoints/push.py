"""Publishing a model on the Hugging Face Hub, in the layout its users' library loads.

``open_clip`` layout: what ``open_clip.push_to_hf_hub`` uploads (``open_clip_config.json``,
``open_clip_model.safetensors``, optionally ``open_clip_pytorch_model.bin``, the tokenizer), which
``open_clip`` and clipforge load as ``hf-hub:REPO``. ``transformers`` layout: what ``clipforge convert
--to hf`` writes (a ``CLIPModel`` folder; ``SiglipModel`` for a model with a logit bias), which
``transformers`` loads with ``from_pretrained``. Both are written by the format writers in this
package, into a temporary folder together with a model card, and uploaded in one commit; nothing
is written next to the source.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Literal, Optional

from .formats import detect_format, load_detected
from .io import PathLike

Layout = Literal["open_clip", "transformers"]
LAYOUTS = ("open_clip", "transformers")
CARD_TAGS = ["clip", "zero-shot-image-classification", "clipforge"]
PIPELINE_TAG = "zero-shot-image-classification"


@dataclass
class PushResult:
    repo_id: str
    layout: str
    revision: Optional[str]
    repo_url: str
    commit_url: str
    files: List[str] = field(default_factory=list)  # paths in the repository, sorted
    source_format: str = ""


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` when the Hub accepts it as a model repository name (``name`` or ``owner/name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"repo id {repo_id!r} is not a valid Hugging Face repository name "
                         f"(expected 'owner/name' or 'name'): {e}") from None
    return repo_id


def _transformers_format(model) -> str:
    """The transformers format a model is written in: SigLIP's when it has a logit bias, else CLIP's."""
    return "hf_siglip" if model.logit_bias is not None else "hf"


def stage(src: PathLike, folder: PathLike, repo_id: str, layout: Layout = "open_clip",
          model_name: Optional[str] = None, torch_bin: bool = False, license: Optional[str] = None) -> List[Path]:
    """Write the files to upload for ``src`` into ``folder`` (which must not exist): the weights in
    ``layout``, the tokenizer, and a model card README.md. Returns the files written.

    ``src`` is any checkpoint clipforge reads (a model folder or a checkpoint file; ``model_name``
    picks the architecture of a bare state dict). ``license`` (a Hub license id such as ``mit``)
    defaults to the one in ``src``'s own model card, if it has one.
    """
    from .formats import FORMATS
    from .openclip_hub import save_openclip_dir

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    src, folder = Path(src), Path(folder)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such model folder or checkpoint file")
    detect_format(src)  # a folder or file of no known format: one error naming what it is not
    model, preprocess, source_format = load_detected(src, model_name)
    if layout == "open_clip":
        written = save_openclip_dir(model, folder, preprocess, safetensors=True, torch_bin=torch_bin, tokenizer=True)
        kind = "open_clip"
    else:
        if torch_bin:
            raise ValueError("torch_bin (open_clip_pytorch_model.bin) belongs to the open_clip layout")
        kind = _transformers_format(model)
        written = FORMATS[kind].save(model, folder, preprocess)
    card = model_card(repo_id, layout, kind, model, license or source_license(src), source_format)
    (folder / "README.md").write_text(card, encoding="utf-8")
    return [*written, folder / "README.md"]


def source_license(src: Path) -> Optional[str]:
    """The ``license`` in a model folder's own card (its README.md), if any; a checkpoint file has none."""
    readme = src / "README.md"
    if not src.is_dir() or not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.license
    except Exception:  # a README without (valid) front matter says nothing about the license
        return None


def _describe(model) -> str:
    cfg = model.cfg
    v, t = cfg.vision_cfg, cfg.text_cfg
    image = (f"ViT, {v.layers} layers, width {v.width}, patch {v.patch_size}" if v.kind == "vit"
             else f"{v.kind} tower" + (f" {v.timm_model_name}" if v.timm_model_name else ""))
    text = (f"transformer, {t.layers} layers, width {t.width}" if t.kind == "transformer"
            else f"{t.hf_model_name or t.kind}")
    act = "QuickGELU" if cfg.quick_gelu else "GELU"
    return (f"| embedding dim | {cfg.embed_dim} |\n| image tower | {image}, {v.image_size} px |\n"
            f"| text tower | {text}, context {t.context_length} |\n| activation | {act} |\n"
            f"| logit bias | {'yes (sigmoid loss, SigLIP-style)' if model.logit_bias is not None else 'no'} |\n")


def model_card(repo_id: str, layout: str, kind: str, model, license: Optional[str], source_format: str) -> str:
    """README.md: YAML front matter the Hub indexes, then how to load the model in each library."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="open_clip" if layout == "open_clip" else "transformers",
                         tags=list(CARD_TAGS), license=license, pipeline_tag=PIPELINE_TAG)
    name = repo_id.split("/")[-1]
    if layout == "open_clip":
        usage = f"""## Use with OpenCLIP

```python
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{repo_id}")
tokenizer = open_clip.get_tokenizer("hf-hub:{repo_id}")
```

## Use with clipforge

```python
import clipforge

model, _, preprocess = clipforge.create_model_and_transforms("hf-hub:{repo_id}")
tokenizer = clipforge.get_tokenizer("hf-hub:{repo_id}")
```
"""
    else:
        cls = "SiglipModel" if kind == "hf_siglip" else "CLIPModel"
        usage = f"""## Use with transformers

```python
from transformers import AutoProcessor, {cls}

model = {cls}.from_pretrained("{repo_id}")
processor = AutoProcessor.from_pretrained("{repo_id}")
```

## Use with clipforge

```python
from huggingface_hub import snapshot_download
from clipforge.checkpoints.formats import load_any

model, preprocess_cfg = load_any(snapshot_download("{repo_id}"))
```
"""
    body = (f"# {name}\n\nA CLIP model for zero-shot image classification and image-text retrieval, "
            f"uploaded with clipforge (`clipforge push`) from a checkpoint in the "
            f"`{source_format}` format, in the {layout} layout.\n\n| | |\n|---|---|\n{_describe(model)}\n{usage}")
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def push_to_hub(src: PathLike, repo_id: str, layout: Layout = "open_clip", *, model_name: Optional[str] = None,
                private: bool = False, revision: Optional[str] = None, commit_message: Optional[str] = None,
                token: Optional[str] = None, torch_bin: bool = False, license: Optional[str] = None,
                endpoint: Optional[str] = None, api: Any = None) -> PushResult:
    """Upload ``src`` to the Hub model repository ``repo_id`` in ``layout``, with a model card.

    The repository is created if missing (``private`` applies then); ``revision`` is a branch,
    created from the default branch if missing. ``token`` defaults to ``HF_TOKEN`` or the cached
    ``hf auth login``. ``endpoint`` is the Hub's URL (default ``HF_ENDPOINT``, else huggingface.co);
    ``api`` an ``huggingface_hub.HfApi``-like client to use instead.
    """
    check_repo_id(repo_id)
    source_format = detect_format(src)  # before anything is written or sent: a clear error for a bad DIR
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="clipforge-push-") as tmp:
        folder = Path(tmp) / "repo"
        written = stage(src, folder, repo_id, layout, model_name=model_name, torch_bin=torch_bin, license=license)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
        message = commit_message or f"Upload {Path(src).name} ({layout} layout) with clipforge"
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   commit_message=message, repo_type="model", token=token)
        files = sorted(str(p.relative_to(folder)) for p in written)
    return PushResult(repo_id, layout, revision, str(repo_url), str(getattr(commit, "commit_url", commit)),
                      files, source_format)


__all__ = ["CARD_TAGS", "LAYOUTS", "PushResult", "check_repo_id", "model_card", "push_to_hub", "stage"]
