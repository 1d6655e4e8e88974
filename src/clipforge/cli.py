"""The ``clipforge`` command line: argument parsing only, generated from typed function signatures.

Each sub-command is a library function; its positional parameters without defaults become positional
arguments, keyword-only ones required ``--options``, the others ``--options`` (``snake_case`` → ``--kebab-case``), typed from the annotation.
The function is imported only when its sub-command runs, so ``clipforge --help`` stays fast.
"""
from __future__ import annotations

import argparse
import collections.abc
import importlib
import inspect
import sys
import typing
from typing import Callable, Dict, List, Optional

# sub-command -> ("module:function", one-line help)
COMMANDS: Dict[str, tuple] = {
    "demo": ("clipforge.demo:demo_main", "train and evaluate a small CLIP on generated shapes (no download)"),
    "models": ("clipforge.pretrained:models_main", "list model architectures"),
    "pretrained": ("clipforge.pretrained:pretrained_main", "list pretrained (model, tag) pairs"),
    "convert": ("clipforge.checkpoints.convert:convert_main",
                "convert a checkpoint between OpenAI, OpenCLIP and Hugging Face formats"),
    "classify": ("clipforge.evaluate.runner:classify_command", "zero-shot classify images against labels"),
    "eval": ("clipforge.evaluate.runner:eval_command", "zero-shot classification, retrieval or linear probe"),
    "train": ("clipforge.train.main:train_main_cli", "train or fine-tune CLIP from a YAML config"),
    "wise-ft": ("clipforge.train.main:wise_ft_main", "interpolate zero-shot and fine-tuned weights (WiSE-FT)"),
    "shards": ("clipforge.data.shards:shards_main", "write WebDataset shards from a CSV/TSV, COCO or JSONL"),
}


def _resolve(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _strip_optional(annotation):
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _add_parameters(parser: argparse.ArgumentParser, fn: Callable) -> None:
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind == param.VAR_KEYWORD:
            continue
        if param.kind == param.VAR_POSITIONAL:  # e.g. train's "key.path=value" overrides
            parser.add_argument(name, nargs="*", default=[], metavar=name.upper())
            continue
        annotation = _strip_optional(hints.get(name, str))
        origin = typing.get_origin(annotation)
        kwargs: dict = {}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
            args = typing.get_args(annotation)
            kwargs.update(nargs="*" if param.default is not param.empty else "+",
                          type=args[0] if args and args[0] is not Ellipsis else str)
        elif origin is typing.Literal:
            kwargs.update(choices=list(typing.get_args(annotation)))
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        if param.default is param.empty and param.kind != param.KEYWORD_ONLY and annotation is not bool:
            parser.add_argument(name, **kwargs)
        else:
            flag = "--" + name.replace("_", "-")
            default = None if param.default is param.empty else param.default
            required = param.default is param.empty
            parser.add_argument(flag, dest=name, default=default, required=required,
                                help="(required)" if required else f"(default: {default})", **kwargs)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description="Train, convert, evaluate and use CLIP models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (target, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's function is imported
            fn = _resolve(target)
            sp.description = (inspect.getdoc(fn) or help_text).split("\n\n")[0]
            _add_parameters(sp, fn)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = vars(parser.parse_args(argv))
    name = args.pop("command")
    if name is None:
        parser.print_help()
        return 1
    fn = _resolve(COMMANDS[name][0])
    var = [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.VAR_POSITIONAL]
    positional = args.pop(var[0]) if var else []
    result = fn(*positional, **args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
