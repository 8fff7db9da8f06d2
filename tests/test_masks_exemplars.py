import cv2
import numpy as np
import pytest
import torch

from bierasing.erase.exemplars import load_folder
from bierasing.erase.masks import MaskFilter, apply_masks, fill_background, filter_mask


def _disk_mask(size=64, r=18, specks=True):
    m = np.zeros((size, size), np.float32)
    cv2.circle(m, (size // 2, size // 2), r, 0.9, -1)
    if specks:
        m[2, 2] = m[60, 3] = 1.0  # isolated specks: must be removed
    return m


def test_filter_mask_removes_specks_keeps_object_and_feathers():
    soft = filter_mask(_disk_mask(512, r=75), MaskFilter())
    assert soft[2, 2] == 0.0 and soft[60, 3] == 0.0
    assert soft[256, 256] == pytest.approx(1.0) and soft[256, 400] == 0.0
    edge = soft[256, 256 + 75 - 2: 256 + 75 + 3]  # around the disk boundary: soft values, not a hard step
    assert ((edge > 0.05) & (edge < 0.95)).sum() >= 2


def test_filter_mask_threshold_and_validation():
    m = _disk_mask(specks=False) * 0.5  # peak 0.45
    assert filter_mask(m, MaskFilter(threshold=0.5)).max() == 0.0
    assert filter_mask(m, MaskFilter(threshold=0.4)).max() > 0.9
    with pytest.raises(ValueError, match="threshold must be in"):
        MaskFilter(threshold=1.5)
    with pytest.raises(ValueError, match="2-D"):
        filter_mask(np.zeros((2, 4, 4)))


def test_fill_background_is_mean_colour_outside_the_mask():
    img = np.zeros((8, 8, 3), np.float32)
    img[:, :4] = [1.0, 0.0, 0.0]
    mask = np.zeros((8, 8), np.float32)
    mask[:, :4] = 1.0
    out = fill_background(img, mask)
    np.testing.assert_allclose(out[0, 0], [1, 0, 0])
    np.testing.assert_allclose(out[0, 7], [0.5, 0, 0])
    with pytest.raises(ValueError, match="mask is 4x4 but the image is 8x8"):
        fill_background(img, np.ones((4, 4)))


def test_apply_masks_checks_sizes_and_empty_masks():
    imgs = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="2 images"):
        apply_masks(imgs, torch.ones(1, 16, 16))
    with pytest.raises(ValueError, match="mask is 8x8 but its image is 16x16"):
        apply_masks(imgs, torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="empty after filtering"):
        apply_masks(imgs, torch.zeros(2, 16, 16))
    out = apply_masks(imgs, torch.ones(2, 16, 16))
    assert out.shape == imgs.shape


def test_load_folder_handles_formats_and_matches_masks(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 2] = 200  # BGR on disk: red in RGB
    cv2.imwrite(str(tmp_path / "a.png"), rgb)
    cv2.imwrite(str(tmp_path / "b.png"), np.full((32, 32), 128, np.uint8))  # grayscale
    cv2.imwrite(str(tmp_path / "c.png"), np.full((32, 32, 3), 65535, np.uint16))  # 16-bit
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[:16, :, 3] = 255  # half transparent
    cv2.imwrite(str(tmp_path / "d.png"), rgba)
    cv2.imwrite(str(tmp_path / "a_mask.png"), np.full((32, 32), 255, np.uint8))
    imgs, masks, names = load_folder(tmp_path)
    assert names == ["a.png", "b.png", "c.png", "d.png"]
    assert imgs.shape == (4, 3, 32, 32)
    assert imgs[0, 0].mean() == pytest.approx(200 / 255, abs=1e-4) and imgs[0, 2].max() == 0
    assert imgs[1].std() == 0 and imgs[2].min() == 1.0
    assert imgs[3, 1].min() == pytest.approx(1.0)  # transparent part filled with the visible mean
    assert masks.shape == (4, 32, 32) and masks[0].min() == 1.0


def test_load_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="has no images"):
        load_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        load_folder(tmp_path)
    (tmp_path / "broken.png").unlink()
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((32, 32, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "x_mask.png"), np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match="mask x_mask.png is 16x16 but x.png is 32x32"):
        load_folder(tmp_path)


def test_word_positions_and_attention_masks(tiny_world):
    from bierasing.erase.attention_mask import attention_masks

    assert tiny_world.word_positions("a red circle", "circle") == [3]
    assert tiny_world.word_positions("a red round shape", "round shape") == [3, 4]
    with pytest.raises(ValueError, match="does not occur"):
        tiny_world.word_positions("a red circle", "star")
    imgs = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    m = attention_masks(tiny_world, imgs, "a red circle", "circle")
    assert m.shape == (3, 32, 32) and float(m.min()) == 0.0 and float(m.max()) == pytest.approx(1.0)
    assert all(mod.processor.attention_store is None for mod in tiny_world.attn2_modules().values())


def test_auto_masks_skip_whole_image_concepts(tiny_world):
    """A background or style is the whole picture: masking its exemplars would paint it over with
    the mean colour, so "auto" leaves them as drawn and masks everything else."""
    from bierasing.backbone import Backbone
    from bierasing.erase.job import ExemplarSpec, load_exemplars

    assert [tiny_world.is_whole_image(c) for c in ("black", "white", "gray")] == [True] * 3
    assert not any(tiny_world.is_whole_image(c) for c in ("circle", "star", "red", "yellow"))
    generic = Backbone.is_whole_image.__get__(object())  # a general model's rule
    assert generic("Van Gogh style") and generic("a snowy background")
    assert not generic("Van Gogh") and not generic("a stylish car")
    with pytest.raises(ValueError, match="auto_mask must be one of auto, attention, none"):
        ExemplarSpec(auto_mask="clipseg")
    logs = []
    raw = load_exemplars(tiny_world, ExemplarSpec("generate", 2, auto_mask="none"), "black", 3, None, logs.append)
    auto = load_exemplars(tiny_world, ExemplarSpec("generate", 2), "black", 3, None, logs.append)
    masked = load_exemplars(tiny_world, ExemplarSpec("generate", 2, auto_mask="attention"), "black", 3, None, logs.append)
    assert torch.equal(auto, raw) and not torch.equal(masked, raw)
    assert any("not masking the exemplars of 'black'" in m for m in logs)
    shape_auto = load_exemplars(tiny_world, ExemplarSpec("generate", 2), "circle", 3, None, logs.append)
    shape_att = load_exemplars(tiny_world, ExemplarSpec("generate", 2, auto_mask="attention"), "circle", 3, None,
                               logs.append)
    assert torch.equal(shape_auto, shape_att)
