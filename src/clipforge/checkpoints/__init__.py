"""Checkpoint formats: reading, writing and converting between OpenCLIP, OpenAI and Hugging Face."""
from .io import CheckpointError, atomic_write, read_checkpoint, save_safetensors, save_torch
from .load import build_with_weights, load_state_dict_into, unwrap_state_dict
from .openai import infer_config

__all__ = ["CheckpointError", "atomic_write", "read_checkpoint", "save_safetensors", "save_torch",
           "build_with_weights", "load_state_dict_into", "unwrap_state_dict", "infer_config"]
