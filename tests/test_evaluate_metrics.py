"""Metrics: hand-computed cases and equality with clip_benchmark's own functions on random features."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_evaluate_utils import numpy2_safe_float

from clipforge.evaluate.metrics import (classification_metrics, image_query_ranks, mean_per_class_recall,
                                        retrieval_metrics, text_query_ranks, topk_accuracy)


def test_topk_accuracy_hand_computed():
    logits = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8], [0.6, 0.7, 0.1], [0.1, 0.2, 0.3]])
    targets = torch.tensor([0, 1, 0, 0])
    # top-1 preds: 0, 2, 1, 2 -> one hit; top-2: {0,1} {2,1} {1,0} {2,1} -> hits at rows 0, 1, 2
    assert topk_accuracy(logits, targets, (1, 2, 3)) == [0.25, 0.75, 1.0]


def test_mean_per_class_recall_hand_computed_and_vs_sklearn():
    from sklearn.metrics import balanced_accuracy_score

    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 0])
    # recalls: 3/4, 1/2, 0/1 -> mean 5/12
    assert mean_per_class_recall(preds, targets) == pytest.approx(5 / 12)
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 7, (500,), generator=gen)
    preds = torch.where(torch.rand(500, generator=gen) < 0.6, targets, torch.randint(0, 7, (500,), generator=gen))
    assert mean_per_class_recall(preds, targets) == pytest.approx(balanced_accuracy_score(targets, preds), abs=1e-12)


def test_classification_metrics_equal_clip_benchmark(monkeypatch):
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    numpy2_safe_float(monkeypatch, zc)
    from sklearn.metrics import balanced_accuracy_score

    gen = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(300, 12, generator=gen), torch.randint(0, 12, (300,), generator=gen)
    ours = classification_metrics(logits, targets, num_classes=12)
    acc1, acc5 = zc.accuracy(logits, targets, topk=(1, 5))
    assert ours["acc1"] == pytest.approx(acc1, abs=1e-12) and ours["acc5"] == pytest.approx(acc5, abs=1e-12)
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(targets, logits.argmax(1)))
    few = classification_metrics(logits[:, :3], targets % 3, num_classes=3)
    assert math.isnan(few["acc5"]) and 0 <= few["acc1"] <= 1


def _hand_case():
    # 2 images, 3 texts: texts 0, 1 describe image 0; text 2 describes image 1.
    scores = torch.tensor([[0.9, 0.1],   # text 0 -> image 0 first (rank 1)
                           [0.2, 0.8],   # text 1 -> image 1 first, its image 0 second (rank 2)
                           [0.7, 0.3]])  # text 2 -> image 0 first, its image 1 second (rank 2)
    return scores, torch.tensor([0, 0, 1])


def test_retrieval_ranks_hand_computed():
    scores, owner = _hand_case()
    # with identity image embeddings, text_emb @ image_emb.T == scores
    image_emb, text_emb = torch.eye(2), scores
    assert text_query_ranks(image_emb, text_emb, owner).tolist() == [1, 2, 2]
    # image 0 query: text scores 0.9, 0.2, 0.7 -> its text 0 is first: rank 1
    # image 1 query: text scores 0.1, 0.8, 0.3 -> its text 2 (0.3) is second: rank 2
    assert image_query_ranks(image_emb, text_emb, owner).tolist() == [1, 2]
    m = retrieval_metrics(image_emb, text_emb, owner, recall_k=(1, 2))
    assert m["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 2)
    assert m["image_retrieval_recall@2"] == m["text_retrieval_recall@2"] == 1.0
    assert m["image_retrieval_mean_rank"] == pytest.approx(5 / 3) and m["image_retrieval_median_rank"] == 2.0
    assert m["text_retrieval_mean_rank"] == pytest.approx(1.5) and m["text_retrieval_median_rank"] == 1.5


def test_retrieval_rejects_images_without_captions():
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="text→image"):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0]))


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_recall_equals_clip_benchmark(seed):
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    gen = torch.Generator().manual_seed(seed)
    n_img, dim = 60, 16
    owner = torch.cat([torch.full((int(c),), i) for i, c in enumerate(torch.randint(1, 6, (n_img,), generator=gen))])
    owner = owner[torch.randperm(len(owner), generator=gen)]
    image_emb = F.normalize(torch.randn(n_img, dim, generator=gen), dim=-1)
    # captions near their image so that recall is neither 0 nor 1
    text_emb = F.normalize(image_emb[owner] + 1.2 * torch.randn(len(owner), dim, generator=gen), dim=-1)
    ks = [1, 5, 10]
    ours = retrieval_metrics(image_emb, text_emb, owner, ks, batch_size=7)

    scores = text_emb @ image_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), owner] = True
    for k in ks:
        ir = (zr.batchify(zr.recall_at_k, scores, positive, 16, "cpu", k=k) > 0).float().mean().item()
        tr = (zr.batchify(zr.recall_at_k, scores.T, positive.T, 16, "cpu", k=k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(ir, abs=1e-7)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(tr, abs=1e-7)
    assert 0 < ours["image_retrieval_recall@1"] < 1 and 0 < ours["text_retrieval_recall@5"] < 1
    # mean/median rank against a direct argsort computation
    order = scores.argsort(dim=1, descending=True)
    direct = (order == owner[:, None]).float().argmax(dim=1) + 1
    assert ours["image_retrieval_mean_rank"] == pytest.approx(direct.float().mean().item())
    assert ours["image_retrieval_median_rank"] == float(np.median(direct.numpy()))
