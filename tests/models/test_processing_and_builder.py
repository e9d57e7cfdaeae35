"""Image loading/preprocessing (spec 1.13) and the pretrained-branch builder (patch 14 -> 16 resampling)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from piip_llava.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from piip_llava.models import ImageLoadError, PiipLlavaImageProcessor, expand_image_tokens, load_image, load_preset
from piip_llava.models.builder import build_model, resample_patch_embedding, resample_position_grid


def _png_bytes(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_load_image_modes(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (255, 0, 0, 0))  # fully transparent red -> white background
    assert load_image(_png_bytes(rgba)).getpixel((0, 0)) == (255, 255, 255)
    gray = Image.new("L", (5, 5), 77)
    assert load_image(_png_bytes(gray)).getpixel((2, 2)) == (77, 77, 77)
    pal = Image.new("P", (3, 3))
    pal.putpalette([10, 20, 30] * 256)
    assert load_image(_png_bytes(pal)).getpixel((1, 1)) == (10, 20, 30)
    # EXIF orientation 6 (rotate 90 CW when displayed): a 4x2 stored image shows as 2x4
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_image(str(path)).size == (2, 4)


def test_load_image_errors(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.txt is not a readable image"):
        load_image(str(bad))
    with pytest.raises(ImageLoadError, match="cannot open image"):
        load_image(str(tmp_path / "missing.png"))
    big = Image.new("RGB", (300, 200))
    with pytest.raises(ImageLoadError, match="60000 pixels, over the limit of 50000"):
        load_image(_png_bytes(big), max_pixels=50_000)


def test_pad_mode_uses_mean_colour_and_normalises():
    proc = PiipLlavaImageProcessor(8, "pad")
    img = Image.new("RGB", (8, 4), (255, 255, 255))  # wide: padded top and bottom with the mean colour
    px = proc.pixel_values([img])
    torch.testing.assert_close(proc([img], return_tensors="pt")["pixel_values"], px)  # the BaseImageProcessor API
    assert px.shape == (1, 3, 8, 8)
    mean = np.array(IMAGENET_MEAN)
    std = np.array(IMAGENET_STD)
    top = px[0, :, 0, 4].numpy()
    expected_top = (np.array([123, 116, 103]) / 255.0 - mean) / std
    np.testing.assert_allclose(top, expected_top, atol=1e-5)
    centre = px[0, :, 4, 4].numpy()
    np.testing.assert_allclose(centre, (1.0 - mean) / std, atol=1e-5)


def test_square_mode_resizes_short_side_and_centre_crops():
    proc = PiipLlavaImageProcessor(4, "square")
    arr = np.zeros((4, 12, 3), dtype=np.uint8)
    arr[:, :4] = 255  # left third white: cropped away by the centre crop
    px = proc.pixel_values([Image.fromarray(arr)])
    assert px.shape == (1, 3, 4, 4)
    black = (0.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(px[0, :, 2, 2].numpy(), black, atol=1e-5)


def test_expand_image_tokens():
    ids, labels = expand_image_tokens([1, 9, 5, 9], [IGNORE_INDEX, IGNORE_INDEX, 5, IGNORE_INDEX], 9, 3)
    assert ids == [1, 9, 9, 9, 5, 9, 9, 9]
    assert labels == [IGNORE_INDEX] * 4 + [5] + [IGNORE_INDEX] * 3


def test_resample_helpers():
    w = torch.randn(8, 3, 14, 14)
    assert resample_patch_embedding(w, 16).shape == (8, 3, 16, 16)
    assert resample_patch_embedding(w, 14) is w
    const = torch.ones(1 + 24 * 24, 8) * 3.0
    out = resample_position_grid(const, 21, has_cls=True)
    assert out.shape == (1 + 21 * 21, 8)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))  # bicubic keeps a constant field


def test_build_model_loads_pretrained_branch_with_patch_resampling(tmp_path):
    """A local CLIP/14 checkpoint loaded into a /16 branch: kernel and position grid resampled (spec 1.4)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    src = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                           num_attention_heads=4, image_size=56, patch_size=14))
    src.save_pretrained(tmp_path / "clip14")
    cfg = load_preset("tiny-piip2_clip_64-128")
    branches = cfg.vision_config.branches
    branches[0]["pretrained"] = str(tmp_path / "clip14")
    branches[0]["backbone"] = dict(branches[0]["backbone"], image_size=56, patch_size=14)
    branches[0]["patch_size"] = 16
    cfg = type(cfg)(**cfg.to_dict())
    model = build_model(cfg, load_branches=True)
    dst = model.vision_tower.branches[0].model
    kernel = dst.embeddings.patch_embedding.weight
    assert kernel.shape == (64, 3, 16, 16)
    torch.testing.assert_close(kernel, resample_patch_embedding(src.embeddings.patch_embedding.weight.detach(), 16))
    assert dst.embeddings.position_embedding.weight.shape == (1 + 3 * 3, 64)  # 56 // 16 = 3
    torch.testing.assert_close(dst.encoder.layers[2].mlp.fc1.weight, src.encoder.layers[2].mlp.fc1.weight)
    # the un-pretrained second branch keeps its own init, and the model runs
    with torch.no_grad():
        maps = model.vision_tower(torch.randn(1, 3, 128, 128))
    assert maps[0].shape == (1, 64, 4, 4)


def test_build_model_rejects_mismatched_branch(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=64, patch_size=16)).save_pretrained(tmp_path / "c")
    cfg = load_preset("tiny-piip2_clip_64-128")
    cfg.vision_config.branches[0]["pretrained"] = str(tmp_path / "c")
    cfg = type(cfg)(**cfg.to_dict())
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|does not match"):
        build_model(cfg)
