"""``clipforge train``: every :class:`~clipforge.train.config.TrainConfig` setting is an option.

Settings are read in order: ``--config run.yaml`` (a YAML file of them), then ``--section.key value``
options or ``section.key=value`` overrides; ``--print_config`` shows the result as YAML and exits.
``torchrun -m clipforge train ...`` runs this on every rank.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

from ..train import train
from ..train.config import TrainConfig, config_parser, parse_config

_VAL_METRICS = ("val_loss", "image_retrieval_recall@1", "image_retrieval_recall@5", "image_retrieval_recall@10",
                "text_retrieval_recall@1")


def _names_data(args: Sequence[str]) -> bool:
    """Whether the arguments choose the training data: a ``--config`` file, or any ``data.`` setting."""
    return any(a.lstrip("-").split("=")[0] == "config" or a.lstrip("-").startswith("data.") for a in args)


def parse(args: Sequence[str], prog: str, description: str) -> Dict[str, Any]:
    """``main``'s arguments: the config the arguments describe (ValueError naming a bad key or value).

    Without ``--config`` or any ``data.`` setting the defaults would train on random synthetic
    data, which is never what a first run means: that is an error saying how to choose.
    """
    config = parse_config(args, config_parser(prog, description))
    if not _names_data(args):
        raise ValueError(f"no --config and no data given: the defaults would train {config.model.name} on random "
                         f"synthetic data. Pass --config run.yaml, or --data.kind csv --data.train_data captions.tsv "
                         f"(--data.kind synthetic to do the former on purpose; `{prog} --help` lists the settings)")
    return {"config": config}


def main(config: TrainConfig) -> int:
    """Train or fine-tune CLIP, e.g. `clipforge train --config run.yaml --optim.lr 1e-4 --data.train_data train.tsv`.

    Settings come from a YAML file (--config), then options (--optim.lr 1e-4) or key.path=value overrides
    (optim.lr=1e-4), later ones winning; the run folder is output_dir/name. Under torchrun (or SLURM) every
    rank runs this; DDP or FSDP is set by --distributed.

    Args:
        config: the run's settings
    """
    summary = train(config)
    print(f"done: {summary['steps']} steps, {summary['samples_per_s']:.1f} samples/s, {summary['data_summary']}; "
          f"model in {summary['final']}")
    val = summary.get("val") or {}
    if val:
        print("validation: " + ", ".join(f"{k} {val[k]:.4f}" for k in _VAL_METRICS if k in val))
    return 0
