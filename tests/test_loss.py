"""Parity of clipforge losses with open_clip.loss (values and gradients), incl. 2/3-rank gloo."""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipforge.loss import (
    ChunkedClipLoss,
    ClipLoss,
    SigLipLoss,
    chunked_clip_loss,
    chunked_cross_entropy,
    clip_loss,
)

SIGLIP_IMPLS = ("bidir", "shift", "reduce", "gather")


def _openclip_loss() -> ModuleType:
    """open_clip/loss.py loaded on its own (it only needs torch), skipping the heavy package import."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _features(n: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, dim, generator=gen, dtype=dtype), dim=-1)
    # Texts correlated with images so positives matter and softmaxes are not flat.
    texts = F.normalize(images + 0.8 * torch.randn(n, dim, generator=gen, dtype=dtype), dim=-1)
    scale = torch.tensor(20.0, dtype=dtype)
    bias = torch.tensor(-4.0, dtype=dtype)
    return [images, texts, scale, bias]


Loss = Callable[..., torch.Tensor]


def _value_and_grads(fn: Loss, inputs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def _max_diffs(mine: Loss, reference: Loss, inputs: Sequence[torch.Tensor]) -> Dict[str, float]:
    """Largest |mine - reference| for the loss and each input gradient."""
    loss, grads = _value_and_grads(mine, inputs)
    ref_loss, ref_grads = _value_and_grads(reference, inputs)
    diffs = {"loss": (loss - ref_loss).abs().item()}
    for name, grad, ref_grad in zip(("image", "text", "scale", "bias"), grads, ref_grads):
        if ref_grad is None:
            assert grad is None or grad.abs().max().item() < 1e-6, name
            continue
        assert grad is not None, f"no gradient for {name}"
        diffs[name] = (grad - ref_grad).abs().max().item()
    return diffs


# ---------------------------------------------------------------------------- single process


@pytest.mark.parametrize("use_bias", [False, True])
def test_clip_loss_matches_openclip(use_bias: bool) -> None:
    oc = _openclip_loss()
    inputs = _features(64, 32, seed=0)
    if use_bias:
        diffs = _max_diffs(lambda i, t, s, b: ClipLoss()(i, t, s, b), lambda i, t, s, b: oc.ClipLoss()(i, t, s, b), inputs)
    else:
        inputs = inputs[:3]
        diffs = _max_diffs(lambda i, t, s: ClipLoss()(i, t, s), lambda i, t, s: oc.ClipLoss()(i, t, s), inputs)
    assert max(diffs.values()) <= 1e-6, diffs


def test_clip_loss_output_dict_and_label_cache() -> None:
    oc = _openclip_loss()
    mine, ref = ClipLoss(cache_labels=True), oc.ClipLoss(cache_labels=True)
    for n in (8, 8, 5):  # cached, reused, then a batch-size change must not reuse stale labels
        images, texts, scale, _ = _features(n, 16, seed=n)
        out = mine(images, texts, scale, output_dict=True)
        assert set(out) == {"contrastive_loss"}
        torch.testing.assert_close(out["contrastive_loss"], ref(images, texts, scale), rtol=0, atol=1e-6)
    assert clip_loss(images, texts, scale).item() == pytest.approx(out["contrastive_loss"].item(), abs=1e-6)


@pytest.mark.parametrize("batch, chunk", [(1000, 128), (1000, 1000), (999, 1), (37, 5), (37, 64), (1, 4)])
def test_chunked_loss_matches_plain(batch: int, chunk: int) -> None:
    inputs = _features(batch, 64, seed=batch + chunk)
    diffs = _max_diffs(
        lambda i, t, s, b: ChunkedClipLoss(chunk_size=chunk)(i, t, s, b),
        lambda i, t, s, b: ClipLoss()(i, t, s, b),
        inputs,
    )
    assert max(diffs.values()) <= 1e-5, diffs


def test_chunked_loss_exact_in_float64() -> None:
    """In float64 any algebra slip in the hand-written backward would show far above rounding."""
    inputs = _features(200, 24, seed=3, dtype=torch.float64)
    diffs = _max_diffs(
        lambda i, t, s, b: chunked_clip_loss(i, t, s, b, chunk_size=17),
        lambda i, t, s, b: clip_loss(i, t, s, b),
        inputs,
    )
    assert max(diffs.values()) <= 1e-11, diffs


def test_chunked_cross_entropy_with_offset_matches_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(5)
    queries = F.normalize(torch.randn(7, 16, generator=gen, dtype=torch.float64), dim=-1)
    keys = F.normalize(torch.randn(21, 16, generator=gen, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(9.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    labels = torch.arange(7) + 14
    diffs = _max_diffs(
        lambda q, k, s, b: chunked_cross_entropy(q, k, s, b, offset=14, chunk_size=3),
        lambda q, k, s, b: F.cross_entropy(s * q @ k.T + b, labels),
        [queries, keys, scale, bias],
    )
    assert max(diffs.values()) <= 1e-12, diffs
    with pytest.raises(ValueError):
        chunked_cross_entropy(queries, keys, scale, offset=15)


def test_chunked_loss_keeps_no_square_matrix_for_backward() -> None:
    batch, dim = 512, 8
    images, texts, scale, _ = (x.requires_grad_() for x in _features(batch, dim, seed=1))
    loss = chunked_clip_loss(images, texts, scale, chunk_size=32)
    saved = loss.grad_fn.saved_tensors
    assert saved and max(t.numel() for t in saved if t is not None) <= batch * dim


def test_chunk_size_option_on_clip_loss() -> None:
    inputs = _features(50, 16, seed=9)[:3]
    plain = ClipLoss()(*inputs)
    torch.testing.assert_close(ClipLoss(chunk_size=7)(*inputs), plain, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        ClipLoss(chunk_size=0)


def test_siglip_loss_matches_openclip() -> None:
    oc = _openclip_loss()
    diffs = _max_diffs(
        lambda i, t, s, b: SigLipLoss()(i, t, s, b),
        lambda i, t, s, b: oc.SigLipLoss()(i, t, s, b),
        _features(48, 32, seed=2),
    )
    assert max(diffs.values()) <= 1e-6, diffs
    with pytest.raises(ValueError):
        SigLipLoss(dist_impl="ring")


# ---------------------------------------------------------------------------- multi-process gloo


def _dist_cases(rank: int, world_size: int) -> List[Tuple[str, Loss, Loss, bool]]:
    """(name, mine, reference, uses_bias) in the same order on every rank."""
    oc = _openclip_loss()
    cases: List[Tuple[str, Loss, Loss, bool]] = []
    for local_loss, with_grad in itertools.product((False, True), repeat=2):
        opts = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world_size)
        tag = f"local_loss={local_loss},gather_with_grad={with_grad}"
        cases.append((f"ClipLoss[{tag}]", ClipLoss(**opts), oc.ClipLoss(**opts), False))
        cases.append((f"ChunkedClipLoss[{tag}]", ChunkedClipLoss(chunk_size=4, **opts), oc.ClipLoss(**opts), False))
    for impl in SIGLIP_IMPLS:
        opts = dict(rank=rank, world_size=world_size, dist_impl=impl)
        cases.append((f"SigLipLoss[{impl}]", SigLipLoss(**opts), oc.SigLipLoss(**opts), True))
    return cases


def _dist_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        inputs = _features(6, 16, seed=100 + rank)
        results = {}
        for name, mine, reference, uses_bias in _dist_cases(rank, world_size):
            if uses_bias:
                results[name] = _max_diffs(mine, reference, inputs)
            else:
                results[name] = _max_diffs(lambda i, t, s, m=mine: m(i, t, s), lambda i, t, s, r=reference: r(i, t, s), inputs[:3])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_losses_match_openclip(world_size: int, tmp_path: Path) -> None:
    _openclip_loss()
    mp.spawn(_dist_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, join=True)
    for rank in range(world_size):
        results: Dict[str, Dict[str, float]] = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(results) == 12
        for name, diffs in results.items():
            print(f"world_size={world_size} rank={rank} {name}: {diffs}")
            tolerance = 1e-5 if name.startswith("Chunked") else 1e-6
            assert max(diffs.values()) <= tolerance, (rank, name, diffs)
