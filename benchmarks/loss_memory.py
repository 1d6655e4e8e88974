"""Peak memory and time of the chunked vs plain CLIP loss (forward + backward, CPU).

Each case runs in a fresh interpreter so that ru_maxrss is that case's own peak.
The plain loss needs several B x B float32 matrices (16 GiB each at B = 65,536), so it
is only run at smaller batches for contrast.

    python benchmarks/loss_memory.py                      # default cases
    python benchmarks/loss_memory.py --cases chunked:65536 plain:8192
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

RESULTS = Path(__file__).resolve().parent / "results" / "loss_memory.json"
DEFAULT_CASES = ["plain:4096", "plain:8192", "chunked:8192", "chunked:65536"]


def _peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _worker(kind: str, batch: int, dim: int, chunk_size: int, threads: int) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from clipforge.loss import ChunkedClipLoss, ClipLoss

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    logit_scale = torch.tensor(100.0, requires_grad=True)
    loss_fn = ChunkedClipLoss(chunk_size=chunk_size) if kind == "chunked" else ClipLoss()
    baseline = _peak_rss_bytes()

    start = time.perf_counter()
    loss = loss_fn(images, texts, logit_scale)
    forward_s = time.perf_counter() - start
    loss.backward()
    total_s = time.perf_counter() - start
    return {
        "kind": kind,
        "batch": batch,
        "dim": dim,
        "chunk_size": chunk_size if kind == "chunked" else None,
        "threads": threads,
        "loss": float(loss),
        "forward_s": round(forward_s, 3),
        "forward_backward_s": round(total_s, 3),
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": _peak_rss_bytes(),
        "fp32_logits_matrix_bytes": batch * batch * 4,
    }


def _run_case(kind: str, batch: int, args: argparse.Namespace) -> Dict[str, Any]:
    command = [
        sys.executable, __file__, "--worker", kind, str(batch),
        "--dim", str(args.dim), "--chunk-size", str(args.chunk_size), "--threads", str(args.threads),
    ]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"kind": kind, "batch": batch, "error": done.stderr.strip().splitlines()[-1:] or [f"rc {done.returncode}"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="kind:batch with kind in {plain, chunked}")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, batch = args.worker
        print(json.dumps(_worker(kind, int(batch), args.dim, args.chunk_size, args.threads)))
        return 0

    rows = []
    header = f"{'loss':<8} {'batch':>7} {'chunk':>6} {'peak RSS GiB':>13} {'base GiB':>9} {'fwd s':>8} {'fwd+bwd s':>10} {'loss value':>11}"
    print(header)
    print("-" * len(header))
    for case in args.cases:
        kind, batch = case.split(":")
        if kind not in ("plain", "chunked"):
            parser.error(f"unknown loss kind in {case!r}")
        row = _run_case(kind, int(batch), args)
        rows.append(row)
        if "error" in row:
            print(f"{kind:<8} {batch:>7} failed: {row['error']}")
            continue
        print(
            f"{kind:<8} {row['batch']:>7} {str(row['chunk_size'] or '-'):>6} {_gib(row['peak_rss_bytes']):>13} "
            f"{_gib(row['baseline_rss_bytes']):>9} {row['forward_s']:>8.2f} {row['forward_backward_s']:>10.2f} "
            f"{row['loss']:>11.5f}",
            flush=True,
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"cases": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
