"""Shared pieces of the serving tests: a tiny checkpoint per test module, a loaded engine, test images, free ports."""
import pytest
from PIL import Image

MAX_PIXELS = 200_000  # the engine used in these tests refuses bigger images (600x400 = 240,000)


@pytest.fixture(scope="module")
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on."""
    from piip_llava.testing import free_port as pick

    return pick()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    from piip_llava.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), gate_scale=0.5)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from piip_llava.serve.inference import InferenceEngine

    return InferenceEngine.load(tiny_ckpt, device="cpu", max_image_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """red / blue PNGs, a text file named .png, and a PNG over MAX_PIXELS."""
    d = tmp_path_factory.mktemp("images")
    paths = {k: str(d / f"{k}.png") for k in ("red", "blue", "not_image", "huge")}
    Image.new("RGB", (64, 48), (220, 30, 30)).save(paths["red"])
    Image.new("RGB", (40, 80), (30, 60, 220)).save(paths["blue"])
    with open(paths["not_image"], "w") as f:
        f.write("this is not an image\n")
    Image.new("RGB", (600, 400), (0, 128, 0)).save(paths["huge"])
    return paths
