"""clipforge: train, fine-tune, convert, evaluate and use CLIP models."""
from .config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from .factory import create_model, create_model_and_transforms, get_tokenizer
from .models.clip import CLIP
from .models.coca import CoCa
from .models.registry import add_model_config, get_model_config, list_models
from .openai_api import available_models, load, tokenize  # OpenAI clip's API: `import clipforge as clip`

__version__ = "0.1.0"

__all__ = [
    "CLIP", "CoCa", "CLIPConfig", "PreprocessConfig", "TextConfig", "VisionConfig",
    "create_model", "create_model_and_transforms", "get_tokenizer",
    "add_model_config", "get_model_config", "list_models",
    "available_models", "load", "tokenize",
]
