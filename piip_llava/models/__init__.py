"""PIIP-LLaVA model classes; importing registers them with the transformers Auto classes."""
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_piip_llava import (
    BranchConfig,
    InteractionConfig,
    PiipLlavaConfig,
    PiipVisionConfig,
    load_preset,
    preset_names,
)
from .modeling_piip_llava import PiipLlavaForConditionalGeneration, PiipLlavaModel, PiipProjector
from .modeling_piip_vision import PiipVisionTower
from .processing_piip_llava import (
    ImageLoadError,
    PiipLlavaImageProcessor,
    PiipLlavaProcessor,
    align_image_token_id,
    expand_image_tokens,
    load_image,
    save_processor,
)

AutoConfig.register("piip_vision", PiipVisionConfig, exist_ok=True)
AutoConfig.register("piip_llava", PiipLlavaConfig, exist_ok=True)
AutoModel.register(PiipLlavaConfig, PiipLlavaModel, exist_ok=True)
AutoModelForCausalLM.register(PiipLlavaConfig, PiipLlavaForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(PiipLlavaConfig, PiipLlavaForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(PiipLlavaConfig, slow_image_processor_class=PiipLlavaImageProcessor, exist_ok=True)
AutoProcessor.register(PiipLlavaConfig, PiipLlavaProcessor, exist_ok=True)

__all__ = [
    "BranchConfig",
    "ImageLoadError",
    "InteractionConfig",
    "PiipLlavaConfig",
    "PiipLlavaForConditionalGeneration",
    "PiipLlavaModel",
    "PiipLlavaImageProcessor",
    "PiipLlavaProcessor",
    "PiipProjector",
    "PiipVisionConfig",
    "PiipVisionTower",
    "align_image_token_id",
    "expand_image_tokens",
    "load_image",
    "load_preset",
    "preset_names",
    "save_processor",
]
