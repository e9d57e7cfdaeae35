"""Mixed precision on the CPU, before a GPU sees it: bf16/fp16 inference of every tiny preset against fp32, and a
bf16 (autocast) training run of the tiny preset through the real entry point."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from piip_llava.models import PiipLlavaForConditionalGeneration, load_preset

PRESETS = ["tiny-piip2_clip_64-128", "tiny-piip2_convnext_clip_64-128", "tiny-piip2_internvit_siglip_64-128",
           "tiny-piip2_clip_normal_64-128", "tiny-piip3_clip_64-96-128", "tiny-llava15_clip_64"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model_and_batch(preset):
    torch.manual_seed(0)
    model = PiipLlavaForConditionalGeneration(load_preset(preset)).eval()
    with torch.no_grad():  # open the gates so the interactions (and their fp32 sampling) matter
        for name, p in model.named_parameters():
            if name.endswith(("ca_weight", "cffn_weight")):
                p.normal_(0.0, 0.5)
    c = model.config
    ids = torch.randint(3, 200, (2, 10))
    ids = torch.cat([ids[:, :2], torch.full((2, c.num_image_tokens), c.image_token_id), ids[:, 2:]], 1)
    size = c.vision_config.image_size
    return model, ids, torch.randn(2, 3, size, size)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inference_on_cpu(preset, dtype):
    model, ids, pixels = _model_and_batch(preset)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits
        half = model.to(dtype)
        out = half(input_ids=ids, pixel_values=pixels.to(dtype)).logits
        features = half.get_image_features(pixels.to(dtype))
        gen = half.generate(input_ids=ids, pixel_values=pixels.to(dtype), attention_mask=torch.ones_like(ids),
                            max_new_tokens=3, do_sample=False)
    assert out.dtype == dtype and features.dtype == dtype  # no fp32 island leaks into the outputs
    assert out.isfinite().all()
    tol = 0.1 if dtype == torch.bfloat16 else 0.02  # bf16 keeps 8 bits of mantissa, fp16 11
    assert (out.float() - ref).abs().max() < tol * ref.abs().max()
    assert gen.shape == (2, ids.shape[1] + 3)


def test_bf16_training_run_on_cpu(tmp_path, tokenizer_dir):
    """`--bf16 true` on the CPU (the Trainer's autocast, no DeepSpeed): the loss is finite and goes down, and the
    saved checkpoint loads and answers."""
    os.makedirs(tmp_path / "images")
    records = []
    for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("blue", (30, 40, 220))] * 8):
        Image.new("RGB", (48, 40), colour).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": f"It is {name}."}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "piip_llava.train", "--stage", "2", "--tune", "full", "--preset", PRESETS[0],
           "--tokenizer_path", tokenizer_dir, "--data_path", str(tmp_path / "data.json"), "--output_dir", str(out),
           "--max_steps", "8", "--per_device_train_batch_size", "4", "--learning_rate", "2e-3", "--bf16", "true",
           "--use_cpu", "true", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
           "--gradient_checkpointing", "false", "--seed", "0", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out / "trainer_state.json") as f:
        losses = [h["loss"] for h in json.load(f)["log_history"] if "loss" in h]
    assert len(losses) == 8 and all(l == l and l < 1e4 for l in losses)  # finite
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    model = PiipLlavaForConditionalGeneration.from_pretrained(out)
    assert all(p.isfinite().all() for p in model.parameters())
