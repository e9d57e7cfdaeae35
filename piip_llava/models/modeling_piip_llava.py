"""PIIP-LLaVA: vision tower -> projector -> visual tokens spliced into any Hugging Face language model.

Laid out as transformers' LLaVA family: `PiipLlavaModel` (what `AutoModel` returns) composes `PiipVisionTower`, a
projector and the base language model `AutoModel.from_config(text_config)`; `PiipLlavaForConditionalGeneration`
adds `lm_head` on top (`model.*` + `lm_head.*` weight names). Image features replace the positions of
`config.image_token_id` in `input_ids` (one position per visual token, expanded by the processor).
Checkpoints written with the earlier flat layout (`vision_tower.*`, `language_model.model.*`,
`language_model.lm_head.*`) load through `LEGACY_KEY_MAPPING`.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast

from ..layers.interaction import InteractionUnit
from .configuration_piip_llava import AUTO_MAP, PiipLlavaConfig, save_remote_code
from .modeling_piip_vision import PiipVisionTower

# old flat layout -> HF layout (regexes for `from_pretrained(key_mapping=...)`); new keys never match
LEGACY_KEY_MAPPING = {
    r"^language_model\.lm_head\.": "lm_head.",
    r"^language_model\.model\.": "model.language_model.",
    r"^vision_tower\.": "model.vision_tower.",
    r"^multi_modal_projector\.": "model.multi_modal_projector.",
}


def convert_legacy_key(key: str) -> str:
    """One weight name of the old flat layout -> its HF-layout name (unchanged when already HF layout)."""
    for pattern, repl in LEGACY_KEY_MAPPING.items():
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return key


class BranchMLP(nn.Module):
    """Per-branch projector: Linear(d_j -> D) -> GroupNorm(32) over channels and all positions -> GELU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, norm: str, groups: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.norm = nn.GroupNorm(groups, out_dim) if norm == "gn" else nn.LayerNorm(out_dim, elementwise_affine=False)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, d_j) -> (B, N, D)."""
        x = self.linear_1(x)
        if isinstance(self.norm, nn.GroupNorm):
            x = self.norm(x.transpose(1, 2)).transpose(1, 2).contiguous()
        else:
            x = self.norm(x)
        return self.linear_2(self.act(x))


class PiipProjector(nn.Module):
    """N-branch projector: upsample every map (fp32 bilinear) to the last branch's grid, one MLP per branch, sum.

    With `out_shape` (the official TwoBranchMLP option) every map is resized to an out_shape x out_shape grid instead.
    """

    def __init__(
        self, in_dims: list[int], out_dim: int, norm: str = "gn", groups: int = 32, out_shape: int | None = None
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(BranchMLP(d, out_dim, norm, groups) for d in in_dims)
        self.out_shape = out_shape

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """maps: [(B, d_j, H_j, W_j)] -> (B, H*W, D) on the last (highest-resolution) grid, or the out_shape grid."""
        size = maps[-1].shape[-2:] if self.out_shape is None else (self.out_shape, self.out_shape)
        out = None
        for mlp, fmap in zip(self.branches, maps):
            if fmap.shape[-2:] != size:
                fmap = F.interpolate(fmap.float(), size=size, mode="bilinear", align_corners=False).to(fmap.dtype)
            y = mlp(fmap.flatten(2).transpose(1, 2).contiguous())
            out = y if out is None else out + y
        return out


class MlpProjector(nn.Module):
    """LLaVA-1.5 `mlp2x_gelu` for single-branch towers: Linear -> GELU -> Linear on the patch tokens."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(maps[0].flatten(2).transpose(1, 2).contiguous())))


def build_projector(config: PiipLlavaConfig, in_dims: list[int]) -> nn.Module:
    hidden = config.text_config.hidden_size
    if config.projector_type == "mlp2x_gelu":
        return MlpProjector(in_dims[0], hidden)
    return PiipProjector(in_dims, hidden, config.projector_norm, config.projector_groups, config.projector_out_shape)


class PiipLlavaPreTrainedModel(PreTrainedModel):
    config_class = PiipLlavaConfig
    config: PiipLlavaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["InteractionBlock", "CLIPEncoderLayer", "SiglipEncoderLayer", "InternVLVisionLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained` + `auto_map` and the code files: the checkpoint loads with
        transformers alone (`trust_remote_code=True`)."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            save_remote_code(str(save_directory))

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """`PreTrainedModel.from_pretrained` that also reads checkpoints in the old flat layout."""
        kwargs.setdefault("key_mapping", LEGACY_KEY_MAPPING)
        return super().from_pretrained(*args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Branch backbones and the LLM are PreTrainedModels and initialise themselves; interactions use the
        # official init (spec 1.14); projector layers keep PyTorch defaults.
        if isinstance(module, InteractionUnit):
            module.reset_parameters()


class PiipLlavaModel(PiipLlavaPreTrainedModel):
    """Vision tower + projector + base language model (no LM head): returns the LM's last hidden states."""

    def __init__(self, config: PiipLlavaConfig) -> None:
        super().__init__(config)
        self.vision_tower = PiipVisionTower(config.vision_config)
        self.multi_modal_projector = build_projector(config, self.vision_tower.out_dims)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs: Any):
        """pixel_values (N, 3, R, R) -> visual tokens (N, num_image_tokens, D).

        With `return_dict=True` (the transformers 5 contract that vLLM's Transformers backend calls) a
        `BaseModelOutputWithPooling` whose `pooler_output` (and `last_hidden_state`) hold the visual tokens.
        """
        features = self.multi_modal_projector(self.vision_tower(pixel_values))
        if return_dict:
            return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=features)
        return features

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ):
        """input_ids (B, L) with `image_token_id` at visual-token positions; pixel_values (N, 3, R, R) for the N
        images of the batch in order of appearance. Given `inputs_embeds` (vLLM merges the visual tokens itself),
        the splice is skipped."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            image_mask = input_ids == self.config.image_token_id
            # the image token id may lie outside the LM vocabulary: embed a valid id there, then overwrite
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
            has_images = pixel_values is not None and pixel_values.shape[0] > 0
            n_tokens = int(image_mask.sum())  # the one host sync of the forward: validates the splice
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            decoding = cache is not None and cache.get_seq_length() > 0
            if has_images and not (decoding and n_tokens == 0):
                features = self.get_image_features(pixel_values)  # (N, T, D)
                expected = features.shape[0] * features.shape[1]
                if n_tokens != expected:
                    raise ValueError(
                        f"the batch has {n_tokens} image-token positions but {features.shape[0]} images x "
                        f"{features.shape[1]} visual tokens = {expected}; each <image> must be expanded to "
                        f"{features.shape[1]} tokens (the processor does it) and match one image"
                    )
                inputs_embeds = inputs_embeds.masked_scatter(
                    image_mask.unsqueeze(-1), features.to(inputs_embeds.dtype).reshape(-1, inputs_embeds.shape[-1])
                )
            elif n_tokens and not decoding:
                raise ValueError(f"the batch has {n_tokens} image-token positions but no pixel_values")
            elif self.training and not has_images:
                # Text-only batch: run the tower on a blank image and add a zero contribution, so every rank
                # uses every parameter (DDP) and ZeRO-3 gathers the same modules on all ranks.
                size = self.config.vision_config.image_size
                blank = inputs_embeds.new_zeros(1, 3, size, size)
                inputs_embeds = inputs_embeds + 0.0 * self.get_image_features(blank).sum().to(inputs_embeds.dtype)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, return_dict=True,
            **kwargs,
        )
        return outputs if return_dict is not False else outputs.to_tuple()


class PiipLlavaForConditionalGeneration(PiipLlavaPreTrainedModel, GenerationMixin):
    """`PiipLlavaModel` + `lm_head`, with `generate()` and KV cache."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: PiipLlavaConfig) -> None:
        super().__init__(config)
        self.model = PiipLlavaModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    # ---- the parts, by their LLaVA names ----
    @property
    def vision_tower(self) -> PiipVisionTower:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> nn.Module:
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        """The base language model (no head; `lm_head` is this model's)."""
        return self.model.language_model

    # ---- plumbing expected by transformers / peft / the trainer ----
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        self.vision_tower.set_grad_checkpointing(enable)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Checkpoint the LLM layers (HF; extra transformers options such as `every_n_layers` pass through) and the
        branch blocks (ours)."""
        self.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
                                                          **kwargs)
        self.vision_tower.set_grad_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self.language_model.gradient_checkpointing_disable()
        self.vision_tower.set_grad_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.language_model.is_gradient_checkpointing

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters split into `branches`, `interactions`, `projector`, `llm` (for separate LRs / freezing).
        `llm` holds the base language model and `lm_head`."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"branches": [], "interactions": [], "projector": [], "llm": []}
        for name, p in self.named_parameters():
            if name.startswith("model.vision_tower.interactions."):
                groups["interactions"].append((name, p))
            elif name.startswith("model.vision_tower."):
                groups["branches"].append((name, p))
            elif name.startswith("model.multi_modal_projector."):
                groups["projector"].append((name, p))
            else:
                groups["llm"].append((name, p))
        return groups

    def no_weight_decay(self) -> set[str]:
        """Parameter names that get no weight decay: biases, norms, gates, position/class embeddings."""
        out = set()
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if (
                p.ndim <= 1
                or leaf in ("ca_weight", "cffn_weight", "class_embedding", "cls_token", "position_embeddings")
                or "position_embedding" in name
            ):
                out.add(name)
        return out

    # ---- forward ----
    def get_image_features(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs: Any):
        """See `PiipLlavaModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, return_dict=return_dict, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, L) with `image_token_id` at visual-token positions; pixel_values (N, 3, R, R) for the N
        images of the batch in order of appearance; labels (B, L) with -100 where not supervised. Extra kwargs
        (cache, `num_items_in_batch`, attention options) go to the language model and the loss.

        In training mode with labels (and no `logits_to_keep`) the LM head runs only at the positions whose next token
        is supervised, and `logits` is (M, vocab) for those M positions in order: instruction data supervises the
        answers only, and the head over the whole vocabulary at every position is a third of a small model's step
        (docs/quickstart.md, "Speed"). The loss is the same; in eval mode `logits` is (B, L, vocab) as usual."""
        kwargs.pop("return_dict", None)
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, return_dict=True, **kwargs,
        )
        hidden = outputs.last_hidden_state
        vocab_size = self.config.text_config.vocab_size
        loss = None
        if labels is not None and self.training and isinstance(logits_to_keep, int) and logits_to_keep == 0:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
            supervised = shift_labels != -100
            logits = self.lm_head(hidden[supervised])
            loss = self.loss_function(logits=logits, labels=None, shift_labels=shift_labels[supervised],
                                      vocab_size=vocab_size, **kwargs)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        # cache / past_key_values (the name depends on the transformers version), hidden states, attentions
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, **kwargs):
        """Pass `pixel_values` on the prefill step only (later steps read the KV cache)."""
        attention_mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and attention_mask is not None and attention_mask.ndim == 2:
            # positions count real tokens only, so left-padded rows match their unpadded selves
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        cache = model_inputs.get("cache", model_inputs.get("past_key_values"))
        first = kwargs.get("is_first_iteration")
        if first is None:
            first = cache is None or cache.get_seq_length() == 0
        if first or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
        else:
            model_inputs.pop("pixel_values", None)
        return model_inputs
