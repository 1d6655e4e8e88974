"""The embedded demo: train a small CLIP on generated shapes with clipforge's own trainer, then measure it.

It lives in its own package because it sits on top of everything else (data, trainer, checkpoints,
evaluation, plots) and nothing in the library may import it. ``clipforge demo`` (``clipforge.cli.demo``)
prints what :func:`run_demo` returns.
"""
from .run import DemoConfig, quick_config, run_demo

__all__ = ["DemoConfig", "quick_config", "run_demo"]
