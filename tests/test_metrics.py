import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from torch2flax.train.metrics import accuracy, confusion_matrix, macro_f1


@pytest.mark.parametrize("seed", range(6))
def test_macro_f1_equals_sklearn_on_random_predictions(seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    n = int(rng.integers(5, 60))
    # Some classes never occur as labels, others never as predictions, some in neither.
    labels = rng.choice([0, 1, 2, 4], size=n)
    preds = rng.choice([0, 2, 3, 4, 5], size=n)
    cm = np.asarray(confusion_matrix(labels, preds, num_classes))
    assert cm.sum() == n
    expected = f1_score(labels, preds, average="macro", zero_division=0)
    assert macro_f1(cm) == pytest.approx(expected, abs=1e-12)
    assert accuracy(cm) == pytest.approx(accuracy_score(labels, preds), abs=1e-12)


def test_confusion_matrix_ignores_masked_rows():
    labels = np.array([[0, 1, 2], [1, 1, 0]])
    preds = np.array([[0, 2, 2], [1, 0, 2]])
    mask = np.array([[True, True, False], [True, False, False]])
    cm = np.asarray(confusion_matrix(labels, preds, 3, mask))
    kept_l, kept_p = labels[mask], preds[mask]
    assert cm.sum() == 3
    assert macro_f1(cm) == pytest.approx(f1_score(kept_l, kept_p, average="macro", zero_division=0))


def test_perfect_and_empty():
    cm = np.asarray(confusion_matrix(np.arange(5), np.arange(5), 5))
    assert macro_f1(cm) == 1.0 and accuracy(cm) == 1.0
    assert macro_f1(np.zeros((3, 3))) == 0.0
