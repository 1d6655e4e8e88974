"""Built-in class names and prompt templates (OpenAI CLIP's, MIT; see assets/templates/LICENSE-openai-clip.txt).

Files are read lazily, on first use, so importing clipforge costs no I/O. Templates are ``str.format``
strings with one ``{}`` placeholder for the class name.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Callable, List, Sequence, Tuple, Union

Template = Union[str, Callable[[str], str]]

# The 7 of OpenAI's 80 ImageNet templates that OpenCLIP uses by default (open_clip.SIMPLE_IMAGENET_TEMPLATES).
_SIMPLE_IMAGENET = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

DATASETS = ("imagenet1k", "cifar10", "cifar100")


@lru_cache(maxsize=None)
def _load(dataset: str) -> dict:
    if dataset not in DATASETS:
        raise KeyError(f"no built-in class names/templates for {dataset!r}; known: {', '.join(DATASETS)}")
    path = resources.files("clipforge") / "assets" / "templates" / f"{dataset}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def get_classnames(dataset: str) -> List[str]:
    """Class names as cleaned for CLIP prompts (a fresh list the caller may change)."""
    return list(_load(dataset)["classes"])


def get_templates(name: str) -> List[str]:
    """Template set by name: a dataset in ``DATASETS`` (its full set) or ``"imagenet1k_simple"``."""
    if name == "imagenet1k_simple":
        return list(_SIMPLE_IMAGENET)
    return list(_load(name)["templates"])


def format_template(template: Template, classname: str) -> str:
    """Fill one template: a callable, or a format string with ``{}`` or ``{c}`` (clip_benchmark's style)."""
    if callable(template):
        return template(classname)
    return template.format(classname, c=classname)


_CONSTANTS = {
    "OPENAI_IMAGENET_TEMPLATES": lambda: tuple(get_templates("imagenet1k")),
    "SIMPLE_IMAGENET_TEMPLATES": lambda: _SIMPLE_IMAGENET,
    "CIFAR_TEMPLATES": lambda: tuple(get_templates("cifar10")),
    "IMAGENET_CLASSNAMES": lambda: tuple(get_classnames("imagenet1k")),
    "CIFAR10_CLASSNAMES": lambda: tuple(get_classnames("cifar10")),
    "CIFAR100_CLASSNAMES": lambda: tuple(get_classnames("cifar100")),
}


def __getattr__(name: str) -> Tuple[str, ...]:
    """Module constants, loaded on first access (PEP 562) to keep import free of file reads."""
    if name in _CONSTANTS:
        return _CONSTANTS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def expand_prompts(classnames: Sequence[str], templates: Sequence[Template]) -> List[str]:
    """All prompts, class-major: the templates of class 0, then of class 1, ..."""
    return [format_template(t, c) for c in classnames for t in templates]
