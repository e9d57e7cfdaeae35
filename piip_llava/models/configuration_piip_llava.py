"""Configuration classes for PIIP-LLaVA: one branch, the N-branch vision tower, the whole MLLM.

`BranchConfig` and `InteractionConfig` are plain validated dataclasses; `PiipVisionConfig` and `PiipLlavaConfig`
are `PretrainedConfig`s (saved in `config.json`). Everything the architecture needs is here and nothing else:
training flags never enter the model config. Validation happens in `__post_init__`/`__init__` and every error says
what to fix.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import AutoConfig, PretrainedConfig

from ..layers.interaction import InteractionConfig

BranchType = Literal["clip", "siglip", "internvit", "convnext"]
BRANCH_TYPES = ("clip", "siglip", "internvit", "convnext")
VIT_TYPES = ("clip", "siglip", "internvit")
PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")

# Self-contained checkpoints (see `piip_llava.models.remote_code`): the code files written next to the weights and
# the `auto_map` entries that point at them.
REMOTE_CODE_FILES = (
    "configuration_piip_llava.py", "modeling_piip_llava.py", "modeling_piip_vision.py", "processing_piip_llava.py",
    "interaction.py", "deform_attn.py", "conversation.py", "constants.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_piip_llava.PiipLlavaConfig",
    "AutoModel": "modeling_piip_llava.PiipLlavaModel",
    "AutoModelForCausalLM": "modeling_piip_llava.PiipLlavaForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_piip_llava.PiipLlavaForConditionalGeneration",
    "AutoProcessor": "processing_piip_llava.PiipLlavaProcessor",
}


def save_remote_code(save_directory: str) -> None:
    """Write the model/processor code files into a checkpoint folder.

    Inside this package they are generated from its modules; a model loaded as remote code (no package) copies the
    files it was loaded from, so re-saving keeps the checkpoint self-contained.
    """
    try:
        remote = importlib.import_module("piip_llava.models.remote_code")
    except ModuleNotFoundError:
        here = os.path.dirname(os.path.abspath(__file__))
        os.makedirs(save_directory, exist_ok=True)
        for name in REMOTE_CODE_FILES:
            if os.path.abspath(os.path.join(save_directory, name)) != os.path.join(here, name):
                shutil.copyfile(os.path.join(here, name), os.path.join(save_directory, name))
    else:
        remote.write_remote_code(save_directory)


@dataclass
class BranchConfig:
    """One backbone of the pyramid.

    `backbone` holds the architecture: for ViTs the kwargs of the transformers vision config (`CLIPVisionConfig`,
    `SiglipVisionConfig`, `InternVLVisionConfig`), for ConvNeXt the kwargs of `timm.models.convnext.ConvNeXt`
    (`depths`, `dims`, optional `head_hidden_size`). `pretrained` (hub id, local dir or timm tag) is only used by
    the builder that loads weights; a model built from the config alone never downloads anything.
    """

    type: BranchType
    image_size: int
    backbone: dict[str, Any]
    pretrained: str | None = None
    patch_size: int | None = None  # ViT run-time patch size; the pretrained kernel is resampled when it differs
    # ViT conv stride when it is not patch_size (CLIP only): the official CLIP wrapper resizes a pretrained kernel to
    # patch_size but keeps the pretrained stride and position grid, so backbone["patch_size"] must equal it
    patch_stride: int | None = None
    use_cls_token: bool = True  # ViT: class token joins self-attention but never interactions
    # inclusive [start, end] block ranges, run in order, one before each interaction
    interaction_indexes: list[list[int]] = field(default_factory=list)
    # True: the ranges tile blocks 0..depth-1 in order (a typo fails early). False (official checkpoints whose ranges
    # leave blocks out, overlap or are empty, [s, s - 1]): the ranges run as given and a block in no range never runs.
    strict_ranges: bool = True
    select_layer: int = -1  # output of this block (-1 = last, -2 = penultimate: LLaVA-1.5 baseline)

    def __post_init__(self) -> None:
        if self.type not in BRANCH_TYPES:
            raise ValueError(f"unknown branch type {self.type!r}; expected one of {BRANCH_TYPES}")
        if self.image_size <= 0:
            raise ValueError(f"branch image_size must be positive, got {self.image_size}")
        self.interaction_indexes = [list(map(int, r)) for r in self.interaction_indexes]
        if any(len(r) != 2 for r in self.interaction_indexes):
            raise ValueError(f"interaction_indexes {self.interaction_indexes} must be [start, end] pairs")
        if self.type in VIT_TYPES:
            hidden, heads = self.backbone.get("hidden_size"), self.backbone.get("num_attention_heads")
            if hidden is None or heads is None or "num_hidden_layers" not in self.backbone:
                raise ValueError(
                    f"{self.type} branch backbone needs hidden_size, num_attention_heads and num_hidden_layers; "
                    f"got keys {sorted(self.backbone)}"
                )
            if hidden % heads:
                raise ValueError(
                    f"{self.type} branch: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
                )
            if self.patch_size is None:
                self.patch_size = int(self.backbone.get("patch_size", 16))
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"{self.type} branch: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
                )
            if self.patch_stride is not None:
                self.patch_stride = int(self.patch_stride)
                pretrained_patch = int(self.backbone.get("patch_size", 16))
                kept = self.type == "clip" and self.patch_stride == pretrained_patch
                if self.patch_stride != self.patch_size and not kept:
                    raise ValueError(
                        f"{self.type} branch: patch_stride {self.patch_stride} other than patch_size {self.patch_size} "
                        f"is for CLIP branches whose backbone patch_size ({pretrained_patch}) it equals (the stride "
                        "and position grid kept from pretraining); leave it unset otherwise"
                    )
        else:
            if "depths" not in self.backbone or "dims" not in self.backbone:
                raise ValueError("convnext branch backbone needs 'depths' and 'dims' (timm ConvNeXt kwargs)")
            if len(self.backbone["depths"]) != len(self.backbone["dims"]):
                raise ValueError("convnext branch: 'depths' and 'dims' must have the same length")
            if self.image_size % self.strides[-1]:
                raise ValueError(
                    f"convnext branch: image_size {self.image_size} must be a multiple of its stride {self.strides[-1]}"
                )
        depth = self.depth
        if not -depth <= self.select_layer < depth:
            raise ValueError(f"select_layer {self.select_layer} out of range for a branch of {depth} blocks")
        if self.interaction_indexes and not self.strict_ranges:
            for start, end in self.interaction_indexes:
                if not (0 <= start <= depth and start - 1 <= end < depth):
                    raise ValueError(
                        f"{self.type} branch interaction range [{start}, {end}] must satisfy 0 <= start <= end + 1 <= "
                        f"{depth} (blocks 0..{depth - 1}; [s, s - 1] is an empty range)"
                    )
            if self.select_layer != -1:
                raise ValueError("select_layer is only for single-branch towers (no interactions)")
        elif self.interaction_indexes:
            expected = 0
            for start, end in self.interaction_indexes:
                if start != expected or end < start:
                    raise ValueError(
                        f"{self.type} branch interaction_indexes {self.interaction_indexes} must be contiguous "
                        f"inclusive ranges covering blocks 0..{depth - 1} in order (range starting at {start}, "
                        f"expected {expected})"
                    )
                expected = end + 1
            if expected != depth:
                raise ValueError(
                    f"{self.type} branch interaction_indexes {self.interaction_indexes} end at block {expected - 1} "
                    f"but the branch has {depth} blocks (0..{depth - 1}); cover every block"
                )
            if self.select_layer != -1:
                raise ValueError("select_layer is only for single-branch towers (no interactions)")
        self.range_outputs()  # a ConvNeXt chain whose widths do not fit fails here, not in the forward

    # ---- derived architecture facts (no module is built) ----
    @property
    def depth(self) -> int:
        """Number of blocks in the branch's block list (ConvNeXt: downsampling layers are blocks of their own)."""
        if self.type in VIT_TYPES:
            return int(self.backbone["num_hidden_layers"])
        depths = self.backbone["depths"]
        return sum(depths) + len(depths) - 1

    @property
    def out_dims(self) -> list[int]:
        """Channel width after each block."""
        if self.type in VIT_TYPES:
            return [int(self.backbone["hidden_size"])] * self.depth
        dims: list[int] = []
        for s, (d, c) in enumerate(zip(self.backbone["depths"], self.backbone["dims"])):
            dims += [c] * (d + (1 if s > 0 else 0))
        return dims

    @property
    def strides(self) -> list[int]:
        """Cumulative stride (input pixels per token side) after each block."""
        if self.type in VIT_TYPES:
            return [int(self.patch_stride or self.patch_size)] * self.depth
        out: list[int] = []
        for s, d in enumerate(self.backbone["depths"]):
            out += [4 * 2**s] * (d + (1 if s > 0 else 0))
        return out

    def _is_downsample(self, block: int) -> bool:
        """ConvNeXt: whether `block` is a stage's downsampling layer (the first block of stages 1, 2, ...)."""
        starts, at = set(), 0
        for s, d in enumerate(self.backbone["depths"]):
            if s > 0:
                starts.add(at)
                at += 1
            at += d
        return block in starts

    def range_outputs(self) -> list[tuple[int, int]]:
        """(width, grid side) of the tokens after each interaction range (single branch: after select_layer),
        following the blocks that actually run: a block outside every range never changes them."""
        if self.type in VIT_TYPES:
            stride = int(self.patch_stride or self.patch_size)
            state = (int(self.backbone["hidden_size"]), (self.image_size - int(self.patch_size)) // stride + 1)
            return [state] * max(1, len(self.interaction_indexes))
        last = self.depth + self.select_layer if self.select_layer < 0 else self.select_layer
        ranges = self.interaction_indexes or [[0, last]]
        dims, width, grid, out = self.out_dims, int(self.backbone["dims"][0]), self.image_size // 4, []
        for start, end in ranges:
            for b in range(start, end + 1):
                expects = dims[b - 1] if b > 0 else int(self.backbone["dims"][0])
                if expects != width:
                    raise ValueError(
                        f"convnext branch interaction_indexes {self.interaction_indexes}: block {b} takes {expects} "
                        f"channels but the blocks run before it leave {width}"
                    )
                width, grid = dims[b], grid // 2 if self._is_downsample(b) else grid
            out.append((width, grid))
        return out

    @property
    def range_widths(self) -> list[int]:
        """Width of the tokens each interaction receives from this branch."""
        return [w for w, _ in self.range_outputs()]

    @property
    def width(self) -> int:
        """Width of the branch's output features."""
        return self.range_outputs()[-1][0]

    @property
    def grid(self) -> int:
        """Side of the output token grid."""
        return self.range_outputs()[-1][1]

    def approx_params(self) -> int:
        """Rough parameter count used to check the inverted-pyramid order (12 d^2 per ViT layer)."""
        if self.type in VIT_TYPES:
            return 12 * int(self.backbone["hidden_size"]) ** 2 * self.depth
        return sum(d * 9 * c * c for d, c in zip(self.backbone["depths"], self.backbone["dims"]))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PiipVisionConfig(PretrainedConfig):
    """N branches ordered from the largest model on the smallest image to the smallest model on the largest."""

    model_type = "piip_vision"

    def __init__(
        self,
        branches: list[dict[str, Any]] | None = None,
        interaction: dict[str, Any] | None = None,
        enforce_pyramid: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # normalised through BranchConfig: validated, defaults filled in (e.g. interaction_indexes)
        self.branches = [(b if isinstance(b, BranchConfig) else BranchConfig(**b)).to_dict() for b in (branches or [])]
        self.interaction = dict(interaction or {}) if not isinstance(interaction, InteractionConfig) else interaction.to_dict()
        # False only for converted official checkpoints: the order rules below then warn instead of refusing
        self.enforce_pyramid = bool(enforce_pyramid)
        if not self.branches:  # an empty config is what transformers builds to read defaults: leave it unchecked
            return
        self.validate()

    def branch_configs(self) -> list[BranchConfig]:
        return [BranchConfig(**b) for b in self.branches]

    def interaction_config(self) -> InteractionConfig:
        return InteractionConfig(**self.interaction)

    def pyramid_violations(self) -> list[str]:
        """Breaches of the parameter-inverted pyramid: along the branches, resolution must rise, model size fall."""
        branches, found = self.branch_configs(), []
        for i in range(len(branches) - 1):
            lo, hi = branches[i], branches[i + 1]
            if lo.image_size >= hi.image_size:
                found.append(
                    f"branch order: branch {i} ({lo.type}, {lo.image_size}px) must see a smaller image than branch "
                    f"{i + 1} ({hi.type}, {hi.image_size}px); order branches from lowest to highest resolution"
                )
            if lo.approx_params() < hi.approx_params():
                found.append(
                    f"branch order: branch {i} ({lo.type}, ~{lo.approx_params() / 1e6:.1f}M params) is smaller than "
                    f"branch {i + 1} (~{hi.approx_params() / 1e6:.1f}M) - the largest model must take the lowest "
                    "resolution (parameter-inverted pyramid)"
                )
        return found

    def validate(self) -> None:
        branches = self.branch_configs()
        inter = self.interaction_config()
        if len(branches) > 4:
            raise ValueError(f"PIIP supports 1 to 4 branches, got {len(branches)}")
        for message in self.pyramid_violations():
            if self.enforce_pyramid:
                raise ValueError(message)
            warnings.warn(f"{message} (kept: enforce_pyramid is False, as in converted official checkpoints)",
                          stacklevel=3)
        if len(branches) == 1:
            if branches[0].interaction_indexes:
                raise ValueError("a single-branch tower has no interactions: leave interaction_indexes empty")
            return
        counts = {len(b.interaction_indexes) for b in branches}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(
                "every branch needs the same, non-zero number of interaction ranges; got "
                + ", ".join(f"branch {i}: {len(b.interaction_indexes)}" for i, b in enumerate(branches))
            )
        for i, b in enumerate(branches):
            for (start, end), width in zip(b.interaction_indexes, b.range_widths):
                value = int(width * inter.deform_ratio) if inter.attn_type == "deform" else width
                if value % inter.num_heads or width % inter.num_heads:
                    raise ValueError(
                        f"branch {i}: interaction width {width} (at block {end})"
                        + (f" with deform_ratio {inter.deform_ratio}" if inter.attn_type == "deform" else "")
                        + f" is not divisible by interaction num_heads {inter.num_heads}"
                    )

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def image_size(self) -> int:
        """Resolution of the processor output: that of the highest-resolution (last) branch."""
        return self.branch_configs()[-1].image_size

    @property
    def num_interactions(self) -> int:
        return len(self.branches[0]["interaction_indexes"]) if self.branches else 0


class PiipLlavaConfig(PretrainedConfig):
    """PIIP vision tower + projector + any Hugging Face causal LM."""

    model_type = "piip_llava"
    sub_configs = {"text_config": AutoConfig, "vision_config": PiipVisionConfig}

    def __init__(
        self,
        vision_config: dict[str, Any] | PiipVisionConfig | None = None,
        text_config: dict[str, Any] | PretrainedConfig | None = None,
        projector_type: Literal["piip_mlp", "mlp2x_gelu"] = "piip_mlp",
        projector_norm: Literal["gn", "ln"] = "gn",
        projector_groups: int = 32,
        projector_out_shape: int | None = None,
        image_token_id: int | None = None,
        image_aspect_ratio: Literal["pad", "square"] = "pad",
        image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        image_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        conversation_template: str = "vicuna_v1",
        **kwargs: Any,
    ) -> None:
        if isinstance(vision_config, dict):
            vision_config = PiipVisionConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else PiipVisionConfig()
        if isinstance(text_config, dict):
            if "model_type" not in text_config:
                raise ValueError("text_config needs a 'model_type' (e.g. 'llama', 'qwen2')")
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        self.text_config = text_config
        if projector_type not in ("piip_mlp", "mlp2x_gelu"):
            raise ValueError(f"projector_type must be 'piip_mlp' or 'mlp2x_gelu', got {projector_type!r}")
        if projector_norm not in ("gn", "ln"):
            raise ValueError(f"projector_norm must be 'gn' or 'ln', got {projector_norm!r}")
        if image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}")
        if projector_out_shape is not None and (projector_type != "piip_mlp" or int(projector_out_shape) <= 0):
            raise ValueError(f"projector_out_shape must be None or a positive grid side for the 'piip_mlp' projector, "
                             f"got {projector_out_shape!r} with {projector_type!r}")
        self.projector_type = projector_type
        self.projector_norm = projector_norm
        self.projector_groups = projector_groups
        # official TwoBranchMLP `out_shape`: every map resized to this square grid (default: the last branch's grid)
        self.projector_out_shape = None if projector_out_shape is None else int(projector_out_shape)
        self.image_aspect_ratio = image_aspect_ratio
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.conversation_template = conversation_template
        if image_token_id is None and text_config is not None:
            image_token_id = text_config.vocab_size  # outside the LM vocabulary: never embedded, never generated
        self.image_token_id = image_token_id
        if text_config is not None:  # transformers 5 ties lm_head to the embeddings by the top-level flag
            kwargs.setdefault("tie_word_embeddings", bool(getattr(text_config, "tie_word_embeddings", False)))
        super().__init__(**kwargs)
        if text_config is not None and self.vision_config.branches:
            hidden = text_config.hidden_size
            if projector_type == "mlp2x_gelu" and self.vision_config.num_branches != 1:
                raise ValueError("projector_type 'mlp2x_gelu' is for single-branch towers; use 'piip_mlp'")
            if projector_type == "piip_mlp" and projector_norm == "gn" and hidden % projector_groups:
                raise ValueError(f"LLM hidden size {hidden} is not divisible by projector_groups {projector_groups}")

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: the grid of the highest-resolution branch (or `projector_out_shape` squared)."""
        if self.projector_out_shape:
            return self.projector_out_shape ** 2
        return self.vision_config.branch_configs()[-1].grid ** 2


def preset_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


def load_preset(name_or_path: str) -> PiipLlavaConfig:
    """A named preset (`presets/NAME.json`) or a path to such a JSON file -> `PiipLlavaConfig`."""
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(PRESET_DIR, f"{name_or_path}.json")
    if not os.path.isfile(path):
        raise ValueError(f"unknown preset {name_or_path!r}; available: {', '.join(preset_names())}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data.pop("_comment", None)
    return PiipLlavaConfig(**data)
