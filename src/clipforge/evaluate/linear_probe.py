"""Linear probe: multinomial logistic regression on frozen, normalised image features.

As in the CLIP paper (A.3): full-batch L-BFGS, L2 strength chosen on a held-out validation split by a
coarse-to-fine search over ``logspace(-6, 2, 97)``, then refit on train+val and scored on test.
The objective is ``mean cross-entropy + weight_decay / 2 * ||W||^2`` (bias not penalised), which is
sklearn's ``LogisticRegression(C=1 / (weight_decay * n_train))``.

A probe must never be scored on the images it was fitted on: when the train and test loaders read
the same images (a dataset folder without a ``train/`` split), a stratified, seeded fraction of them
is held out as the test split instead, with a warning, and the result says so (``lp_test_split``).
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .features import Device, image_features
from .metrics import classification_metrics

WEIGHT_DECAYS = tuple(np.logspace(-6, 2, num=97).tolist())


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                            max_iter: int = 1000) -> torch.nn.Linear:
    """Minimise the regularised cross-entropy exactly (float64 L-BFGS, strong Wolfe line search)."""
    x64, y = x.double(), y.long()
    linear = torch.nn.Linear(x.shape[1], num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)  # convex problem: a fixed start makes the fit deterministic
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(x64), y) + 0.5 * weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return linear.requires_grad_(False)


def _accuracy(linear: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return (linear(x.double()).argmax(dim=1) == y).float().mean().item()


def select_weight_decay(x: torch.Tensor, y: torch.Tensor, num_classes: int, val_fraction: float = 0.2,
                        seed: int = 0, weight_decays: Sequence[float] = WEIGHT_DECAYS) -> float:
    """Best validation accuracy by a coarse grid (every 16th value) then halving steps around the peak.

    Ties prefer the weaker penalty on the coarse grid and the current peak while refining.
    """
    n_val = max(1, int(round(len(x) * val_fraction)))
    if n_val >= len(x):
        raise ValueError(f"need more than {n_val} training samples to hold out a validation split")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, fit = perm[:n_val], perm[n_val:]
    scores: Dict[int, float] = {}

    def score(i: int) -> float:
        if i not in scores:
            model = fit_logistic_regression(x[fit], y[fit], num_classes, weight_decays[i])
            scores[i] = _accuracy(model, x[val], y[val])
        return scores[i]

    step = max(1, (len(weight_decays) - 1) // 6)
    best = max(range(0, len(weight_decays), step), key=lambda i: (score(i), -i))
    step //= 2
    while step > 0:
        candidates = [max(best - step, 0), best, min(best + step, len(weight_decays) - 1)]
        best = max(candidates, key=lambda i: (score(i), i == best))
        step //= 2
    return float(weight_decays[best])


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: Optional[int] = None, weight_decay: Optional[float] = None,
                 val_fraction: float = 0.2, seed: int = 0) -> Dict[str, float]:
    """clip_benchmark's linear-probe metrics from features; ``weight_decay=None`` searches for it."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    if weight_decay is None:
        weight_decay = select_weight_decay(train_x, train_y, num_classes, val_fraction, seed)
    model = fit_logistic_regression(train_x, train_y, num_classes, weight_decay)
    metrics = classification_metrics(model(test_x.double()).float(), test_y, num_classes)
    return {**{f"lp_{name}": value for name, value in metrics.items()},
            "weight_decay": weight_decay, "seed": seed, "normalized": True}


def held_out_split(y: torch.Tensor, test_fraction: float = 0.2, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, test indices): ``test_fraction`` of each class (at least one where it has two or more
    samples) drawn by a seeded permutation, so every class is in both splits where it can be."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    fit, test = [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        fit.append(idx[n_test:])
    return torch.cat(fit).sort().values, torch.cat(test).sort().values


def _image_ids(loader: Iterable) -> Optional[List[str]]:
    """The image paths a loader reads in order, where its dataset lists them (clipforge's datasets do)."""
    paths = getattr(getattr(loader, "dataset", None), "paths", None)
    return None if paths is None else [str(p) for p in paths]


def same_images(train_loader: Iterable, test_loader: Iterable) -> bool:
    """Whether both loaders read the same set of images (then the probe would be tested on its training data)."""
    a, b = _image_ids(train_loader), _image_ids(test_loader)
    return a is not None and b is not None and set(a) == set(b)


def evaluate_linear_probe(model: torch.nn.Module, train_loader: Iterable, test_loader: Optional[Iterable],
                          num_classes: Optional[int] = None, device: Optional[Device] = None,
                          precision: str = "fp32", seed: int = 0, use_tqdm: bool = True,
                          test_fraction: float = 0.2) -> Dict[str, object]:
    """Extract normalised image features of both loaders, then :func:`linear_probe`.

    With ``test_loader=None``, or one reading the same images as ``train_loader``, the test split is
    :func:`held_out_split` of the training images (warned about; ``lp_test_split`` is then
    ``"held_out"`` and ``lp_test_fraction`` its share, else ``"given"`` and 0).
    """
    held_out = test_loader is None or same_images(train_loader, test_loader)
    train_x, train_y = image_features(model, train_loader, device, precision, use_tqdm=use_tqdm)
    if held_out:
        warnings.warn(f"linear probe: the dataset has no separate train split, so {test_fraction:.0%} of its "
                      f"images (per class, seed {seed}) are held out as the test split; the rest train the probe",
                      stacklevel=2)
        fit, test = held_out_split(train_y, test_fraction, seed)
        if not len(test):
            raise ValueError("linear probe: too few images to hold out a test split (need 2 or more per class)")
        train_x, train_y, test_x, test_y = train_x[fit], train_y[fit], train_x[test], train_y[test]
    else:
        test_x, test_y = image_features(model, test_loader, device, precision, use_tqdm=use_tqdm)
    result: Dict[str, object] = dict(linear_probe(train_x, train_y, test_x, test_y, num_classes, seed=seed))
    result.update(lp_test_split="held_out" if held_out else "given", lp_test_fraction=test_fraction if held_out else 0.0,
                  lp_n_train=len(train_y), lp_n_test=len(test_y))
    return result
