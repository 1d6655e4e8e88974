"""``clipforge export``: checks the options, runs :func:`clipforge.export.export`, prints what it wrote."""
from __future__ import annotations

from typing import Optional

from . import UsageError


def main(model: str, out: str, *, pretrained: Optional[str] = None, format: str = "onnx", int8: bool = False,
         int8_encoders: Optional[str] = None, opset: int = 18, int8_min_cosine: float = 0.999,
         overwrite: bool = False, progress: bool = True) -> int:
    """Export the image and text encoders as ONNX or torch.export programs, with tokenizer and preprocessing.

    OUT gets image_encoder.onnx (image [N,3,H,W] float32 -> image_features), text_encoder.onnx
    (text [N,L] int64 -> text_features; L is dynamic for causal text towers, fixed otherwise),
    tokenizer/ and export_config.json (preprocessing, context length, pad/eot ids, logit scale and
    bias). The folder is written atomically; clipforge.export.OnnxCLIP(OUT) runs it with onnxruntime.

    Args:
        model: architecture name, hf-hub:ORG/REPO or local-dir:PATH
        out: the output folder
        pretrained: weights: a pretrained tag or a checkpoint file (none: random weights)
        format: onnx (.onnx files, onnxruntime) or torch.export (.pt2 files, torch.export.load)
        int8: onnxruntime dynamic int8 weights, kept only if the check features keep cosine >= int8_min_cosine
        int8_encoders: with int8, the encoders to quantise: image, text or image,text (default both)
        opset: ONNX opset (18 or newer)
        int8_min_cosine: the least cosine to the fp32 features that int8 must keep on the check batch
        overwrite: replace an existing export at OUT
        progress: show a progress bar
    """
    from ..export import ExportOptions, export

    if int8_encoders is not None and not int8:
        raise UsageError("int8_encoders applies with int8: add --int8")
    encoders = {} if int8_encoders is None else {"int8_encoders": tuple(e.strip() for e in int8_encoders.split(","))}
    try:
        options = ExportOptions(format=format, opset=opset, int8=int8, int8_min_cosine=int8_min_cosine,
                                overwrite=overwrite, **encoders)
    except ValueError as e:
        raise UsageError(str(e)) from e
    result = export(model, out, pretrained, options, progress=progress)
    cfg = result.config
    for path in result.files:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    checks = ", ".join(f"{k} {v:.3g}" for k, v in cfg.check.items() if isinstance(v, float))
    weights = ", ".join(f"{e} {w}" for e, w in cfg.encoder_weights.items())
    print(f"{result.out}: {cfg.format} ({weights}), text length {cfg.text_length}; check batch: {checks}")
    return 0
