"""Constants shared by data, model and serving code (values only, no state)."""

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"  # the literal placeholder in LLaVA-format data and prompts
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # images above this are refused before decoding
