"""Evaluation: zero-shot classification, retrieval and linear probe, with clip_benchmark's metrics."""
from .datasets import (CaptionedImages, LabeledImages, captions_collate, captions_table, coco_captions,
                       image_folder, labels_table, open_eval_dataset, wds_dataset)
from .linear_probe import evaluate_linear_probe, fit_logistic_regression, linear_probe
from .metrics import classification_metrics, mean_per_class_recall, retrieval_metrics, topk_accuracy
from .retrieval import evaluate_retrieval, retrieval_embeddings
from .runner import run_eval
from .templates import get_classnames, get_templates
from .zero_shot import build_zero_shot_classifier, classify_images, evaluate_zero_shot, zero_shot_classify

__all__ = [
    "CaptionedImages", "LabeledImages", "captions_collate", "captions_table", "coco_captions",
    "image_folder", "labels_table", "open_eval_dataset", "wds_dataset",
    "evaluate_linear_probe", "fit_logistic_regression", "linear_probe",
    "classification_metrics", "mean_per_class_recall", "retrieval_metrics", "topk_accuracy",
    "evaluate_retrieval", "retrieval_embeddings",
    "run_eval",
    "get_classnames", "get_templates",
    "build_zero_shot_classifier", "classify_images", "evaluate_zero_shot", "zero_shot_classify",
]
