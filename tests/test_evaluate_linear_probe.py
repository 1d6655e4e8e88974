"""Linear probe: the L-BFGS logistic regression against sklearn's, and the weight-decay search."""
import pytest
import torch
import torch.nn.functional as F

from clipforge.evaluate.linear_probe import WEIGHT_DECAYS, fit_logistic_regression, linear_probe, select_weight_decay


def _blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(num_classes, dim, generator=gen)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centers[y] + spread * torch.randn(len(y), dim, generator=gen)
    perm = torch.randperm(len(y), generator=gen)
    return x[perm], y[perm]


def test_fit_matches_sklearn_logistic_regression():
    sk = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(40, 4, 8, spread=2.5, seed=0)  # overlapping classes: the optimum is interior
    wd = 1e-2
    ours = fit_logistic_regression(x, y, 4, wd)
    ref = sk.LogisticRegression(C=1 / (wd * len(x)), tol=1e-10, max_iter=10_000).fit(x.double().numpy(), y.numpy())
    w_ref, b_ref = torch.from_numpy(ref.coef_), torch.from_numpy(ref.intercept_)

    def objective(w, b):
        return (F.cross_entropy(x.double() @ w.T + b, y) + 0.5 * wd * w.pow(2).sum()).item()

    # same optimum: objective within 1e-9 of sklearn's (measured ~4e-11), parameters and probabilities close
    assert objective(ours.weight, ours.bias) - objective(w_ref, b_ref) < 1e-9
    # softmax parameters are defined up to a shift shared by all classes; the penalty fixes W's, not b's
    assert (ours.weight - w_ref).abs().max().item() < 1e-4
    probs_ours, probs_ref = ours(x.double()).softmax(1), (x.double() @ w_ref.T + b_ref).softmax(1)
    assert (probs_ours - probs_ref).abs().max().item() < 1e-4
    assert torch.equal(probs_ours.argmax(1), torch.from_numpy(ref.predict(x.double().numpy())))


def test_probe_accuracy_equals_sklearn_on_separable_data():
    sk = pytest.importorskip("sklearn.linear_model")
    train_x, train_y = _blobs(30, 6, 10, spread=0.5, seed=1)
    test_x, test_y = _blobs(10, 6, 10, spread=0.5, seed=1)  # same centres (same seed), new noise draw order
    result = linear_probe(train_x, train_y, test_x, test_y)
    assert result["weight_decay"] in WEIGHT_DECAYS
    ref = sk.LogisticRegression(C=1 / (result["weight_decay"] * len(train_x)), max_iter=10_000)
    ref_acc = ref.fit(train_x.numpy(), train_y.numpy()).score(test_x.numpy(), test_y.numpy())
    assert result["lp_acc1"] == pytest.approx(ref_acc) == 1.0
    assert result["lp_acc5"] == 1.0 and result["lp_mean_per_class_recall"] == 1.0


def test_weight_decay_search_regularises_when_features_are_mostly_noise():
    # 60 samples, 200 dims, one weakly informative feature: a weak penalty overfits the noise dims
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 200, generator=gen), torch.randint(0, 2, (60,), generator=gen)
    x[:, 0] += y
    assert select_weight_decay(x, y, 2) > 1e-3
    with pytest.raises(ValueError, match="validation split"):
        select_weight_decay(x[:1], y[:1], 2)
