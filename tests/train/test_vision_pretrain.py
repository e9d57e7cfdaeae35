"""Stage-0 vision pretraining: label validation, learning a separable label, frozen LLM, a checkpoint stage 1 loads."""
import json
import os
import random

import pytest
import torch
from PIL import Image

from piip_llava.train import vision_pretrain as vp

PRESET = "tiny-piip2_clip_64-128"
COLORS = {"red": (220, 30, 30), "blue": (30, 40, 220)}


def write_labelled(root, n=48):
    """Images whose left half is one colour and right half another: two label fields, both learnable."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = random.Random(0)
    records = []
    for i in range(n):
        left, right = rng.choice(sorted(COLORS)), rng.choice(sorted(COLORS))
        img = Image.new("RGB", (64, 64), COLORS[left])
        img.paste(Image.new("RGB", (32, 64), COLORS[right]), (32, 0))
        rel = f"images/{i}.png"
        img.save(os.path.join(root, rel))
        records.append({"image": rel, "labels": {"left": left, "right": right}})
    path = os.path.join(root, "labels.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return path


def test_label_validation_names_record_and_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"image": "a.png", "labels": {"x": "1"}}, {"image": "b.png", "labels": {"y": "1"}}]))
    with pytest.raises(ValueError, match=r"record 1 \(b.png\).*\['y'\].*\['x'\]"):
        vp.load_label_records(str(path))
    path.write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(ValueError, match=r"record 0 \(a.png\).*'labels'"):
        vp.load_label_records(str(path))
    path.write_text(json.dumps([{"image": "a.png", "labels": {"x": [1]}}]))
    with pytest.raises(ValueError, match=r"record 0.*label 'x'"):
        vp.load_label_records(str(path))
    path.write_text(json.dumps([{"image": "a.png", "labels": {"x": "b"}}, {"image": "c.png", "labels": {"x": "a"}}]))
    records, classes = vp.load_label_records(str(path))
    assert classes == {"x": ["a", "b"]} and len(records) == 2


def test_arguments_need_one_model_source():
    with pytest.raises(ValueError, match="exactly one"):
        vp.VisionPretrainArguments("d", "i", "o")
    with pytest.raises(ValueError, match="exactly one"):
        vp.VisionPretrainArguments("d", "i", "o", preset="a", model_path="b")


def test_probe_learns_labels_and_checkpoint_continues(tmp_path, tokenizer_dir):
    from piip_llava.models import PiipLlavaForConditionalGeneration
    from piip_llava.models.builder import build_model
    from piip_llava.models.configuration_piip_llava import load_preset

    data = write_labelled(str(tmp_path))
    out = tmp_path / "stage0"
    code = vp.main(["--data-path", data, "--image-folder", str(tmp_path), "--preset", PRESET,
                    "--tokenizer-path", tokenizer_dir, "--output-dir", str(out), "--max-steps", "40",
                    "--batch-size", "8", "--num-eval", "16", "--eval-steps", "20", "--no-progress"])
    assert code == 0
    metrics = json.loads((out / vp.METRICS_FILE).read_text())
    assert metrics["classes"] == {"left": ["blue", "red"], "right": ["blue", "red"]}
    assert metrics["num_train"] == 32 and metrics["num_eval"] == 16
    assert [h["step"] for h in metrics["history"]] == [20, 40]
    assert metrics["final_eval_accuracy"] == {"left": 1.0, "right": 1.0}  # chance is 0.5

    trained = PiipLlavaForConditionalGeneration.from_pretrained(str(out))
    torch.manual_seed(0)  # the seed stage 0 builds with: the LLM must be exactly the untouched initialisation
    fresh = build_model(load_preset(PRESET), load_branches=True)
    for (name, a), b in zip(trained.language_model.state_dict().items(), fresh.language_model.state_dict().values()):
        assert torch.equal(a, b), name
    moved = [n for (n, a), b in zip(trained.vision_tower.state_dict().items(), fresh.vision_tower.state_dict().values())
             if not torch.equal(a, b)]
    assert len(moved) > 10
    assert os.path.isfile(out / "tokenizer_config.json")
    # a checkpoint of ours: continuing from it (stage 1's MODEL_PATH) is the same code path
    again = vp.main(["--data-path", data, "--image-folder", str(tmp_path), "--model-path", str(out),
                     "--output-dir", str(tmp_path / "again"), "--max-steps", "2", "--batch-size", "8",
                     "--num-eval", "16", "--no-progress"])
    assert again == 0


def test_config_json_path_is_accepted(tmp_path):
    from piip_llava.models.configuration_piip_llava import PRESET_DIR

    data = write_labelled(str(tmp_path), n=20)
    code = vp.main(["--data-path", data, "--image-folder", str(tmp_path), "--config",
                    os.path.join(PRESET_DIR, f"{PRESET}.json"), "--output-dir", str(tmp_path / "o"), "--max-steps", "2",
                    "--batch-size", "4", "--no-progress"])
    assert code == 0 and (tmp_path / "o" / "model.safetensors").is_file()


def test_missing_image_names_the_record(tmp_path):
    data = write_labelled(str(tmp_path), n=20)
    os.remove(tmp_path / "images" / "0.png")
    with pytest.raises(Exception, match=r"0\.png"):
        vp.main(["--data-path", data, "--image-folder", str(tmp_path), "--preset", PRESET, "--output-dir",
                 str(tmp_path / "o"), "--max-steps", "30", "--batch-size", "4", "--num-eval", "0", "--no-progress"])


def test_tokenizer_fit_ignores_the_image_placeholder_and_refuses_extra_tokens(tokenizer_dir):
    """A checkpoint's own tokenizer (the LLM's 512 ids + `<image>` at 512) continues training; one more token fails."""
    from piip_llava.data.tokenizer import load_tokenizer
    from piip_llava.models.processing_piip_llava import add_image_token

    tokenizer = load_tokenizer(tokenizer_dir)
    assert add_image_token(tokenizer) == 512 and len(tokenizer) == 513
    args = vp.VisionPretrainArguments("d", "i", "o", preset=PRESET, tokenizer_path="tok")
    assert vp.build_stage0_model(args, tokenizer).config.text_config.vocab_size == 512
    tokenizer.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match=r"tokenizer tok has 514 tokens but the LLM vocabulary is 512"):
        vp.build_stage0_model(args, tokenizer)


def test_token_targets_take_the_region_covering_most_of_each_cell():
    index = {"color": {"none": 0, "blue": 1, "red": 2}}
    regions = [{"box": [0, 0, 32, 16], "labels": {"color": "red"}},     # the top-left 2x1 cells
               {"box": [52, 52, 64, 64], "labels": {"color": "blue"}},  # 3/4 x 3/4 of the bottom-right cell
               {"box": [16, 48, 17, 50], "labels": {"color": "blue"}}]  # 2 px: under min_cover, ignored
    grid = vp.token_targets(regions, index, (64, 64), grid=4)
    assert grid.shape == (1, 16)
    assert grid[0].view(4, 4).tolist() == [[2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]


def test_region_validation_names_record_and_region(tmp_path):
    ok = {"box": [0, 0, 4, 4], "labels": {"color": "red"}}
    assert vp.region_classes("p", [{"image": "a", "regions": [ok]}]) == {"color": ["none", "red"]}
    assert vp.region_classes("p", [{"image": "a"}]) == {}
    with pytest.raises(ValueError, match=r"record 1 \(b\) has no 'regions' while record 0"):
        vp.region_classes("p", [{"image": "a", "regions": [ok]}, {"image": "b"}])
    with pytest.raises(ValueError, match=r"record 0 \(a\): regions\[1\]: 'box'"):
        vp.region_classes("p", [{"image": "a", "regions": [ok, {"box": [4, 0, 2, 4], "labels": {"color": "red"}}]}])
    with pytest.raises(ValueError, match=r"record 0 \(a\): regions\[0\]: label 'color' must be a string or int"):
        vp.region_classes("p", [{"image": "a", "regions": [{"box": [0, 0, 1, 1], "labels": {"color": [1]}}]}])
    with pytest.raises(ValueError, match=r"regions\[0\]: label fields \['shape'\] differ"):
        vp.region_classes("p", [{"image": "a", "regions": [ok]}, {"image": "b", "regions": [
            {"box": [0, 0, 1, 1], "labels": {"shape": "x"}}]}])


def test_token_probe_learns_what_lies_under_each_token(tmp_path, tokenizer_dir):
    data = write_labelled(str(tmp_path))
    records = json.loads(open(data).read())
    for rec in records:  # the left and right halves as regions: every token has the colour under it as its label
        rec["regions"] = [{"box": [0, 0, 32, 64], "labels": {"color": rec["labels"]["left"]}},
                          {"box": [32, 0, 64, 64], "labels": {"color": rec["labels"]["right"]}}]
    with open(data, "w") as f:
        json.dump(records, f)
    out = tmp_path / "stage0"
    assert vp.main(["--data-path", data, "--image-folder", str(tmp_path), "--preset", PRESET,
                    "--tokenizer-path", tokenizer_dir, "--output-dir", str(out), "--max-steps", "40",
                    "--batch-size", "8", "--num-eval", "16", "--eval-steps", "40", "--no-progress"]) == 0
    metrics = json.loads((out / vp.METRICS_FILE).read_text())
    assert metrics["token_classes"] == {"color": ["none", "blue", "red"]}
    acc = metrics["final_eval_accuracy"]
    assert acc["left"] == 1.0 and acc["right"] == 1.0
    assert acc["tokens:color"] >= 0.95  # chance among the two colours is 0.5


def test_probe_loss_weighs_the_per_token_fields_against_the_image_level_ones():
    torch.manual_seed(0)
    features = torch.randn(2, 4, 8)
    probe, token_probe = vp.FlatTokenProbe(4, 8, [3, 2]), vp.TokenProbe(8, [5])
    targets, tok = torch.tensor([[0, 1], [2, 0]]), torch.randint(0, 5, (2, 1, 4))
    flat = torch.stack([torch.nn.functional.cross_entropy(lg, targets[:, k])
                        for k, lg in enumerate(probe(features))]).mean()
    per_token = torch.nn.functional.cross_entropy(token_probe(features)[0].flatten(0, 1), tok[:, 0].flatten())
    torch.testing.assert_close(vp.probe_losses(features, probe, None, targets, tok, 3.0), flat)
    torch.testing.assert_close(vp.probe_losses(features, probe, token_probe, targets, tok, 0.0), flat)
    torch.testing.assert_close(vp.probe_losses(features, probe, token_probe, targets, tok, 3.0), flat + 3 * per_token)
    with pytest.raises(ValueError, match="token-loss-weight"):
        vp.VisionPretrainArguments(data_path="d", image_folder="i", output_dir="o", preset=PRESET,
                                   token_loss_weight=-1)
