"""Image reliance: answer loss with the right images vs with the batch's images rolled by one."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from piip_llava.evaluation.image_reliance import image_reliance, main
from piip_llava.testing import build_tiny_checkpoint


def _records(n_images: int, same_image: bool) -> list[dict]:
    recs = [{"id": str(i), "image": "img0.png" if same_image else f"img{i}.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"},
                               {"from": "gpt", "value": f"color number {i}"}]} for i in range(n_images)]
    recs.insert(2, {"id": "text", "conversations": [{"from": "human", "value": "Say hi."},
                                                    {"from": "gpt", "value": "hi"}]})
    return recs


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("reliance")
    ckpt = build_tiny_checkpoint(str(root / "ckpt"), tokenizer_dir=tokenizer_dir, gate_scale=0.5)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    for name, same in (("distinct.json", False), ("same.json", True)):
        (root / name).write_text(json.dumps(_records(6, same)))
    return root, ckpt


def _run(root, ckpt, data, *extra):
    out = root / f"{data}.out.json"
    assert main(["--model-path", ckpt, "--data-path", str(root / data), "--batch-size", "4", "--output", str(out),
                 "--no-progress", *extra]) == 0
    return json.loads(out.read_text())


def test_same_image_everywhere_gives_zero_gap(setup):
    root, ckpt = setup
    r = _run(root, ckpt, "same.json")
    assert r["records"] == 6 and r["records_left_out"] == 0 and r["text_only_records_skipped"] == 1
    assert r["loss_own_image"] > 0 and r["gap"] == pytest.approx(0.0, abs=1e-5)


def test_distinct_images_change_the_loss_and_own_loss_is_the_training_loss(setup, tokenizer_dir):
    root, ckpt = setup
    r = _run(root, ckpt, "distinct.json")
    assert r["records"] == 6 and r["answer_tokens"] > 6
    assert abs(r["gap"]) > 1e-5  # a random tiny model still sees its images (interaction gates drawn != 0)

    from piip_llava.data.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
    from piip_llava.data.tokenizer import load_tokenizer
    from piip_llava.models import PiipLlavaForConditionalGeneration, PiipLlavaImageProcessor

    model = PiipLlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    tok = load_tokenizer(ckpt)
    cfg = model.config
    ds = LazySupervisedDataset(str(root / "distinct.json"), tok, PiipLlavaImageProcessor.from_config(cfg),
                               cfg.image_token_id, cfg.num_image_tokens, template=cfg.conversation_template,
                               model_max_length=512, progress=False)
    col = DataCollatorForSupervisedDataset(tok.pad_token_id, 512)
    idx = [i for i, m in enumerate(ds.modality_lengths) if m > 0]
    one_batch = image_reliance(model, ds, col, idx, batch_size=len(idx), progress=False)
    batch = col([ds[i] for i in idx])
    batch.pop("num_skipped", None)
    with torch.no_grad():
        assert one_batch["loss_own_image"] == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        image_reliance(model, ds, col, idx, batch_size=1, progress=False)
    left = image_reliance(model, ds, col, idx[:5], batch_size=4, progress=False)
    assert left["records"] == 4 and left["records_left_out"] == 1
