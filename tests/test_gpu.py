"""GPU tests (marked `gpu`; skipped without CUDA, run by `bash scripts/gpu_check.sh`): bf16/fp16 forward and
generation of a tiny model on the GPU agree with fp32 on the CPU."""
import pytest
import torch

pytestmark = pytest.mark.gpu


def _model():
    from piip_llava.models import PiipLlavaForConditionalGeneration, load_preset

    torch.manual_seed(0)
    return PiipLlavaForConditionalGeneration(load_preset("tiny-piip2_clip_64-128")).eval()


def _batch(config, device):
    ids = torch.randint(3, 200, (2, 10))
    ids = torch.cat([ids[:, :2], torch.full((2, config.num_image_tokens), config.image_token_id), ids[:, 2:]], 1)
    size = config.vision_config.image_size
    return {"input_ids": ids.to(device), "pixel_values": torch.randn(2, 3, size, size).to(device)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_on_gpu_matches_fp32_cpu(dtype):
    model = _model()
    batch = _batch(model.config, "cpu")
    with torch.no_grad():
        ref = model(**batch).logits
        gpu = model.to("cuda", dtype)
        out = gpu(**{k: (v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")) for k, v in batch.items()})
    assert out.logits.dtype == dtype
    torch.testing.assert_close(out.logits.float().cpu(), ref, rtol=0.05, atol=0.05)


def test_greedy_generation_on_gpu_bf16():
    model = _model().to("cuda", torch.bfloat16)
    batch = _batch(model.config, "cuda")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 5)
