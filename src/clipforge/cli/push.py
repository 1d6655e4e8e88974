"""``clipforge push``: upload a model to the Hugging Face Hub (the library's ``checkpoints.push``)."""
from __future__ import annotations

from typing import Literal, Optional

from ..checkpoints.push import push_to_hub


def main(src: str, repo_id: str, *, layout: Literal["open_clip", "transformers"] = "open_clip",
         private: bool = False, revision: Optional[str] = None, commit_message: Optional[str] = None,
         token: Optional[str] = None, model_name: Optional[str] = None, torch_bin: bool = False,
         license: Optional[str] = None, endpoint: Optional[str] = None) -> int:
    """Upload a model folder or checkpoint to a Hugging Face Hub model repository, with a model card.

    Args:
        src: model folder (OpenCLIP hub folder, transformers CLIP/SigLIP folder) or checkpoint file
        repo_id: Hub repository, owner/name (created if missing)
        layout: open_clip (open_clip_config.json + open_clip_model.safetensors + tokenizer, loaded by
            open_clip and clipforge as hf-hub:REPO) or transformers (what `clipforge convert --to hf` writes)
        private: create the repository private (when it does not exist yet)
        revision: branch to commit to (created if missing; default: the main branch)
        commit_message: the commit's message
        token: Hub access token (default: HF_TOKEN, else the cached `hf auth login`)
        model_name: architecture of a state-dict file whose shapes do not identify it (see `clipforge models`)
        torch_bin: also upload open_clip_pytorch_model.bin (open_clip layout)
        license: Hub license id for the model card (default: the license in SRC's own README.md)
        endpoint: Hub URL (default: HF_ENDPOINT, else https://huggingface.co)
    """
    result = push_to_hub(src, repo_id, layout, model_name=model_name, private=private, revision=revision,
                         commit_message=commit_message, token=token, torch_bin=torch_bin, license=license,
                         endpoint=endpoint)
    print(f"read {src} ({result.source_format})")
    print(f"pushed {len(result.files)} files to {result.repo_url} ({result.layout} layout"
          f"{', branch ' + result.revision if result.revision else ''}): {', '.join(result.files)}")
    print(f"commit: {result.commit_url}")
    return 0
