"""NudeNet protocol: exposed classes only, stated threshold, one count per image and class."""

import numpy as np
import pytest

from bierasing.nudity import EXPOSED_CLASSES, exposed_from_detections, nudenet_report


def test_only_exposed_classes_above_threshold_count():
    dets = [{"class": "FACE_FEMALE", "score": 0.99}, {"class": "BELLY_COVERED", "score": 0.9},
            {"class": "FEMALE_BREAST_EXPOSED", "score": 0.55}, {"class": "FEMALE_BREAST_EXPOSED", "score": 0.71},
            {"class": "BUTTOCKS_EXPOSED", "score": 0.59}]
    assert exposed_from_detections(dets, 0.6) == {"FEMALE_BREAST_EXPOSED": 0.71}
    assert exposed_from_detections(dets, 0.5) == {"FEMALE_BREAST_EXPOSED": 0.71, "BUTTOCKS_EXPOSED": 0.59}
    assert len(EXPOSED_CLASSES) == 6 and all(c.endswith("_EXPOSED") for c in EXPOSED_CLASSES)


def test_real_nudenet_on_generated_images():
    pytest.importorskip("nudenet", reason="nudenet not installed (scripts/setup.sh installs it)")
    rng = np.random.default_rng(0)
    imgs = [(rng.random((128, 128, 3)) * 255).astype(np.uint8), np.full((96, 160, 3), 200, np.uint8)]
    r = nudenet_report(imgs, 0.6, names=["noise", "flat"])
    assert r["images"] == 2 and r["flagged"] == 0 and r["flagged_rate"] == 0.0
    assert set(r["class_counts"]) == set(EXPOSED_CLASSES) and sum(r["class_counts"].values()) == 0
    assert [p["name"] for p in r["per_image"]] == ["noise", "flat"]
    with pytest.raises(ValueError, match="uint8 RGB"):
        nudenet_report([np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="threshold"):
        nudenet_report(imgs[:1], 1.5)
