"""Shared benchmark helpers: timing, matmul peak, FLOP counting, memory, machine description and
the three models (clipforge, OpenCLIP, transformers) built on one seeded random initialisation."""
from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RECALLS = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]


def mean_recall(metrics: Dict[str, float]) -> float:
    """The mean of retrieval R@1/5/10 in both directions, the one-number score of the Flickr8k runs."""
    return sum(metrics[k] for k in RECALLS) / len(RECALLS)

# A few ImageNet classes/templates, used only when ../shared is absent.
FALLBACK_CLASSES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark",
                    "electric ray", "stingray", "rooster", "hen", "ostrich", "American robin",
                    "bald eagle", "tree frog", "loggerhead sea turtle", "grand piano",
                    "red-breasted merganser", "sports car", "airliner", "espresso", "daisy"]
FALLBACK_TEMPLATES = ["a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
                      "a photo of the hard to see {}.", "a low resolution photo of the {}.",
                      "a rendering of a {}.", "graffiti of a {}.", "a cropped photo of the {}.",
                      "a tattoo of a {}.", "the embroidered {}.", "itap of a {}.", "a plushie {}.",
                      "a photo of a {}.", "a drawing of the {}.", "art of the {}.", "a toy {}."]


@dataclass
class Timing:
    seconds: float   # median seconds per call
    iters: int


def timeit(fn: Callable[[], object], iters: int, warmup: int = 1, min_seconds: float = 0.0) -> Timing:
    """Median wall time of ``fn`` over ``iters`` calls (more if ``min_seconds`` is not reached)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), len(times))


def matmul_peak(dtype: torch.dtype, n: int = 2048, iters: int = 5) -> float:
    """Achieved FLOP/s of a large square matmul: the practical peak other numbers are divided by."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = timeit(lambda: a @ b, iters, warmup=2)
    return 2 * n ** 3 / t.seconds


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, counted by dispatch (matmul/conv/SDPA), as ``FlopCounterMode`` defines them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> Dict[str, object]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    with open("/proc/loadavg") as f:
        load = [float(x) for x in f.read().split()[:3]]
    return {
        "cpu": fields.get("Model name", platform.processor()).strip(),
        "cores": int(fields.get("CPU(s)", "0").strip() or 0),
        "threads": torch.get_num_threads(),
        "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags],
        # what decides bf16 speed: torch's kernel level, and the precision ``auto`` picks here
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "auto_precision_cpu": _auto_precision(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_start": load,
    }


def _auto_precision() -> str:
    from clipforge.precision import resolve_precision

    return resolve_precision("auto", "cpu")[0]


def loadavg() -> List[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial norm affine parameters/statistics, so that every parameter affects the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def build_models(name: str, with_hf: bool = True, seed: int = 0):
    """(clipforge, open_clip, transformers CLIPModel or None) sharing one seeded random init.

    The OpenCLIP model is initialised, its weights are loaded into clipforge, and the HF model is
    read back from what clipforge's HF writer (``save_hf_clip``) produced, so all three compute
    the same function.
    """
    import open_clip

    import clipforge

    torch.manual_seed(seed)
    ref = open_clip.create_model(name).eval()
    randomize_norms(ref, seed)
    model = clipforge.create_model(name).eval()
    model.load_state_dict(ref.state_dict())
    hf = None
    if with_hf and not model.cfg.vision_cfg.is_resnet:
        from transformers import CLIPModel

        from clipforge.checkpoints.hf_clip import save_hf_clip

        with tempfile.TemporaryDirectory() as tmp:
            save_hf_clip(model, tmp, tokenizer=False)
            hf = CLIPModel.from_pretrained(tmp).eval()
    return model, ref, hf


def zero_shot_vocab(num_classes: Optional[int] = None):
    """(class names, templates): ImageNet's 1000 x 80 from ../shared, else a built-in subset."""
    path = SHARED / "assets" / "imagenet_classes_templates.json"
    if path.exists():
        data = json.loads(path.read_text())
        classes, templates = data["classes"], data["templates"]
    else:
        classes, templates = FALLBACK_CLASSES, FALLBACK_TEMPLATES
    if num_classes is not None and num_classes < len(classes):
        stride = len(classes) // num_classes  # spread over the list, for representative lengths
        classes = classes[::stride][:num_classes]
    return classes, templates


def cifar10_samples(per_class: int):
    """[(path, label)] from ../shared/data/cifar10-test (sorted, ``per_class`` each), or []."""
    root = SHARED / "data" / "cifar10-test"
    if not root.exists():
        return [], []
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).glob("*.jpg"))[:per_class]]
    return samples, classes
