"""benchmarks/gpu_check.py runs its whole code path on the CPU with a tiny model (CI has no GPU)."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytest.importorskip("open_clip_train")
pytest.importorskip("pandas")  # open_clip_train's data module imports it


def test_gpu_check_runs_on_cpu_with_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    out = gpu_check.main(["--device", "cpu", "--tiny", "--precision", "fp32", "--steps", "6", "--batch", "8",
                          "--log-every", "2", "--workers", "0", "--encode-iters", "2", "--out", str(tmp_path / "check")])
    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["train"]["speedup"] == pytest.approx(out["train"]["speedup"])
    for trainer in ("open_clip", "clipforge"):
        run = saved["train"][trainer]
        assert run["samples_per_s"] > 0 and run["windows"] >= 2  # logged windows after the first (start-up)
        assert 1.0 < run["first_loss"] < 4.2  # a random model on a batch of 8: near ln(8) = 2.08, within 2x
    # the same weights in both libraries: the encodings agree (fp32 here; the GPU run uses bf16)
    assert saved["encode"]["max_abs_diff"] < 1e-5
    assert saved["encode"]["clipforge"]["images_per_s"] > 0
    assert "| train samples/s |" in (tmp_path / "check.md").read_text()
    assert saved["machine"]["torch_cpu_capability"]


def test_gpu_check_refuses_cuda_without_a_gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit, match="no CUDA device here"):
        gpu_check.main([])
