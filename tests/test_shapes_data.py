"""The synthetic shapes data is reproducible from its seed, and `classify` reads its ground truth back."""

import numpy as np
import pytest

from training.shapes import COLOURS, SHAPES, Label, all_labels, classify, make_dataset

MIN_CLASSIFIER_ACCURACY = 0.98  # on clean rendered images; generated images are scored with the same reader
SAMPLES = 600


def test_same_seed_gives_same_data():
    images_a, labels_a = make_dataset(50, seed=7)
    images_b, labels_b = make_dataset(50, seed=7)
    assert labels_a == labels_b
    np.testing.assert_array_equal(images_a, images_b)


def test_different_seed_gives_different_data():
    images_a, _ = make_dataset(50, seed=7)
    images_b, _ = make_dataset(50, seed=8)
    assert np.abs(images_a.astype(int) - images_b).mean() > 10


def test_dataset_shape_and_captions():
    images, labels = make_dataset(8, seed=0)
    assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8
    assert labels[0].caption == f"a {labels[0].colour} {labels[0].shape} on a {labels[0].background} background"


def test_every_combination_is_distinct_colours():
    labels = all_labels()
    assert len(labels) == len(SHAPES) * len(COLOURS) * (len(COLOURS) - 1)
    assert all(label.colour != label.background for label in labels)


def test_classifier_reads_ground_truth():
    images, labels = make_dataset(SAMPLES, seed=123)
    found = [classify(image) for image in images]
    per_field = {
        field: np.mean([getattr(f, field) == getattr(l, field) for f, l in zip(found, labels)])
        for field in ("colour", "shape", "background")
    }
    overall = np.mean([f == l for f, l in zip(found, labels)])
    assert overall >= MIN_CLASSIFIER_ACCURACY, (overall, per_field)


def test_blank_image_has_no_shape():
    blank = np.full((64, 64, 3), 240, np.uint8)
    assert classify(blank) == Label("none", "none", "white")


def test_classifier_rejects_wrong_input():
    with pytest.raises(ValueError, match="expected HxWx3 uint8"):
        classify(np.zeros((64, 64), np.uint8))
