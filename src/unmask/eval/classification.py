"""Classification predictions and metrics (accuracy, MCC, ROC AUC, cross-entropy)."""

from __future__ import annotations

import numpy as np
import torch

from ..data.labelled import LabelledSplit
from ..models.classifier import SequenceClassifier
from ..runtime import autocast


@torch.no_grad()
def predict(model: SequenceClassifier, split: LabelledSplit, batch_size: int, device, precision: str) -> torch.Tensor:
    """Class probabilities (N, C), float64."""
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        ids = split.ids[start:start + batch_size].to(device)
        keep = split.keep[start:start + batch_size].to(device)
        with autocast(torch.device(device), precision):
            out.append(model(ids, keep).double().softmax(-1).cpu())
    return torch.cat(out)


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, MCC, ROC AUC and cross-entropy of class probabilities (N, C) against labels (N,)."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef, roc_auc_score

    y, p = labels.numpy(), probs.numpy()
    predicted = p.argmax(1)
    result = {"n": len(y), "accuracy": float(accuracy_score(y, predicted)),
              "mcc": float(matthews_corrcoef(y, predicted)),
              "cross_entropy": float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None)).mean())}
    present = np.unique(y)
    if len(present) < 2:
        result["auc"] = float("nan")
    elif p.shape[1] == 2:
        result["auc"] = float(roc_auc_score(y, p[:, 1]))
    else:
        result["auc"] = float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=np.arange(p.shape[1])))
    return result


def selection_score(metrics: dict, classes: int) -> float:
    """The score that picks a classifier's best checkpoint: AUC with two classes, else accuracy."""
    return metrics["auc"] if classes == 2 else metrics["accuracy"]
