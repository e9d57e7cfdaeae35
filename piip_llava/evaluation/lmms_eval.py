"""lmms-eval 0.7.x model adapter: run piip_llava checkpoints on lmms-eval's benchmarks.

lmms-eval finds a model by name only if it is registered before its CLI starts, so this module is also the launcher:

    python -m piip_llava.evaluation.lmms_eval --model piip_llava --model_args pretrained=CKPT \
        --tasks mme --batch_size 8 --log_samples --output_path out/lmms

`--model_args` takes `pretrained` (a checkpoint or LoRA adapter folder, as `InferenceEngine.load`), and optionally
`conv_mode` (template name; default: the checkpoint's), `dtype` (fp16/bf16/fp32; default fp16 on CUDA, fp32 on
CPU), `device` (also lmms-eval's `--device`), `max_new_tokens` (when a task does not set it; default 128). Answers
come from `InferenceEngine.generate`, the same call our own evaluation makes: one image per question (the first
visual; images are decoded as the official loaders do), greedy when the task's temperature is 0, cut at the task's
`until` strings. Single process only; `loglikelihood` (multiple-choice by likelihood) is not implemented.

Needs the `lmms` extra (`pip install -e ".[lmms]"`); importing `piip_llava` never imports lmms-eval.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "piip_llava.evaluation.lmms_eval needs lmms-eval 0.7.x: pip install -e \".[lmms]\" "
        "(or pip install \"lmms-eval>=0.7,<0.8\")"
    ) from e

from PIL import Image

MODEL_NAME = "piip_llava"

__all__ = ["MODEL_NAME", "PiipLlava", "main", "register"]


@register_model(MODEL_NAME)
class PiipLlava(lmms):
    """lmms-eval `simple` model over `InferenceEngine` (prompt = the task's text as one user turn + its image)."""

    is_simple = True

    def __init__(self, pretrained: str, conv_mode: str | None = None, dtype: str | None = None,
                 device: str | None = None, batch_size: int | str | None = 1, max_new_tokens: int | str = 128,
                 **kwargs: Any) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)  # lmms-eval passes it with --batch_size; no automatic batch sizing here
        if kwargs:
            raise ValueError(f"unknown --model_args for {MODEL_NAME}: {sorted(kwargs)}; accepted: pretrained, "
                             "conv_mode, dtype, device, max_new_tokens (and lmms-eval's --batch_size)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"the {MODEL_NAME} adapter runs in one process; launch lmms-eval without accelerate/torchrun")
        from .backends import eval_device_dtype, load_local_engine

        device, dtype = eval_device_dtype(device, dtype)
        self.engine = load_local_engine(pretrained, device, dtype, conv_mode)
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 1
        self.batch_size = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)
        if self.batch_size < 1 or self.default_max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {self.batch_size}, {max_new_tokens}")

    # ---- requests -> engine calls ----
    def _image(self, visuals: Sequence[Any] | None) -> Image.Image | None:
        """The first visual as an RGB image (decoded as the official loaders do), or None for text-only docs."""
        from piip_llava.models import load_image

        visuals = [v for v in (visuals or []) if v is not None]
        if not visuals:
            return None
        first = visuals[0]
        if not isinstance(first, Image.Image):
            raise TypeError(f"{MODEL_NAME} takes images only; the task gave a {type(first).__name__} "
                             f"({str(first)[:80]!r}, a video or audio?)")
        return load_image(first, self.engine.max_image_pixels, decode="official")

    def _settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """lmms-eval generation_kwargs -> InferenceEngine.generate keyword arguments."""
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        if int(gen_kwargs.get("num_beams", 1) or 1) != 1:
            raise ValueError(f"{MODEL_NAME} generates greedily or by sampling; num_beams > 1 is not supported")
        return {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.default_max_new_tokens),
                "temperature": temperature, "top_p": float(gen_kwargs.get("top_p", 1.0) or 1.0),
                "stop": list(until)}

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batches of up to `batch_size` requests with the same task and generation settings, in request order."""
        from piip_llava.serve.inference import ChatRequest

        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            _, gen_kwargs, _, _, task, split = req.args
            key = json.dumps([task, split, gen_kwargs], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=f"{MODEL_NAME} generating", disable=self.rank != 0)
        for indices in groups.values():
            settings = self._settings(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                batch = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    image = self._image(doc_to_visual(self.task_dict[task][split][doc_id]))
                    batch.append(ChatRequest(messages=[{"role": "user", "content": context}], image=image))
                for i, text in zip(chunk, self.engine.generate(batch, **settings), strict=True):
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"{MODEL_NAME} answers generate_until tasks only; loglikelihood tasks (multiple "
                                  "choice scored by likelihood) are not implemented")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} answers single-turn generate_until tasks only")


def register() -> None:
    """Make `--model piip_llava` resolvable: lmms-eval 0.7 looks models up in `MODEL_REGISTRY_V2` (the legacy
    `register_model` above is kept for code that reads the old registry)."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest

    MODEL_REGISTRY_V2.register_manifest(
        ModelManifest(model_id=MODEL_NAME, simple_class_path="piip_llava.evaluation.lmms_eval.PiipLlava"), overwrite=True)


def main(argv: Sequence[str] | None = None) -> int:
    """lmms-eval's CLI (`lmms-eval --model piip_llava ...` flags) with the adapter registered."""
    register()
    from lmms_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["python -m piip_llava.evaluation.lmms_eval", *argv]  # cli_evaluate parses sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
