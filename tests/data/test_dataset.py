"""LazySupervisedDataset: expansion, truncation, skipped records with reasons; collator; modality sampler."""
import json
import logging

import pytest
import torch
from PIL import Image

from piip_llava.constants import IGNORE_INDEX
from piip_llava.data.conversation import ConversationTemplate
from piip_llava.data.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
from piip_llava.data.sampler import LengthGroupedSampler, get_modality_length_grouped_indices
from piip_llava.models.processing_piip_llava import PiipLlavaImageProcessor

N_IMG = 8


def rec(rid, value="<image>\nWhat is it?", answer="A red car.", image="red.png"):
    r = {"id": rid, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]}
    if image is not None:
        r["image"] = image
    return r


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(tmp_path / "big.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    return tmp_path


def make(folder, records, tokenizer, name="data.jsonl", **kw):
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=2))
    kw.setdefault("template", "vicuna_v1")
    return LazySupervisedDataset(str(path), tokenizer, PiipLlavaImageProcessor(16), image_token_id=len(tokenizer),
                                 num_image_tokens=N_IMG, progress=False, **kw)


def test_image_sample_expanded_and_text_only(folder, tokenizer):
    ds = make(folder, [rec("a"), rec("t", value="Hi there friend", image=None)], tokenizer, name="data.json")
    s = ds[0]
    img = len(tokenizer)
    assert s["input_ids"].dtype == torch.long and s["labels"].shape == s["input_ids"].shape
    assert (s["input_ids"] == img).sum().item() == N_IMG
    pos = (s["input_ids"] == img).nonzero().flatten().tolist()
    assert pos == list(range(pos[0], pos[0] + N_IMG))  # contiguous
    assert (s["labels"][s["input_ids"] == img] == IGNORE_INDEX).all()
    assert tokenizer.decode(s["labels"][s["labels"] != IGNORE_INDEX].tolist()) == "A red car.</s>"
    assert s["pixel_values"].shape == (3, 16, 16) and s["pixel_values"].dtype == torch.float32
    assert s["num_skipped"] == 0
    t = ds[1]
    assert t["pixel_values"] is None and (t["input_ids"] == img).sum().item() == 0
    # word counts: image positive, text-only negative; lengths add 128 for images (LLaVA)
    assert ds.modality_lengths == [4 + 3, -(3 + 3)]  # whitespace words; "<image>" counts as one (as LLaVA)
    assert ds.lengths == [7 + 128, 6]


def test_bad_records_skipped_and_counted(folder, tokenizer, caplog):
    straddle = ConversationTemplate(name="bad", system="", system_format="", user_format="Q {content}",
                                    assistant_prefix=" t", answer_format="{content}</s>", stop_str="</s>")
    records = [
        rec("ok"),
        rec("missing", image="nope.png"),
        rec("broken", image="broken.png"),
        rec("toolarge", image="big.png"),
        {"id": "noanswer", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}]},
        rec("twotags", value="<image> and <image>"),
        rec("texttag", value="<image>\nWhere is the image?", image=None),
        {"id": "schema", "conversations": "not a list"},
        rec("multi", image=["red.png", "red.png"]),
        "{this is not json",
        rec("ok2"),
    ]
    ds = make(folder, records, tokenizer, max_image_pixels=30 * 30 - 1)
    assert len(ds) == 11
    with caplog.at_level(logging.WARNING, logger="piip_llava.data.dataset"):
        s = ds[1]  # record 1 is bad: skips forward to the next good one (ok2) and reports how many it skipped
    assert s["num_skipped"] == 9
    assert tokenizer.decode(s["labels"][s["labels"] != IGNORE_INDEX].tolist()) == "A red car.</s>"
    assert dict(ds.skipped) == {"missing_image": 1, "bad_image": 1, "image_too_large": 1, "no_assistant_turn": 1,
                                "image_tags": 2, "schema": 1, "multi_image": 1, "bad_json": 1}
    assert ds.skip_report() == dict(ds.skipped)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("id 'missing'" in m and "data.jsonl:2 " in m for m in msgs)
    assert any("id 'toolarge'" in m and "image_too_large" in m for m in msgs)
    # MaskingError -> skipped with reason "masking", never trained on
    ds2 = make(folder, [rec("m", value="x", answer="he", image=None), rec("fine", value="x", answer="cat", image=None)],
               tokenizer, name="m.jsonl", template=straddle)
    assert ds2[0]["num_skipped"] == 1 and dict(ds2.skipped) == {"masking": 1}


def test_truncation_keeps_image_and_alignment(folder, tokenizer):
    long_answer = " ".join(["red car"] * 40)
    full = make(folder, [rec("a", answer=long_answer)], tokenizer, template="plain", name="f.jsonl")[0]
    n = len(full["input_ids"])
    ds = make(folder, [rec("a", answer=long_answer)], tokenizer, template="plain", model_max_length=20, name="t.jsonl")
    s = ds[0]
    assert len(s["input_ids"]) == 20 < n
    assert s["input_ids"].tolist() == full["input_ids"][:20].tolist()
    assert s["labels"].tolist() == full["labels"][:20].tolist()
    assert (s["input_ids"] == len(tokenizer)).sum().item() == N_IMG
    # image tokens would not fit: the sample is skipped (counted), not cut through
    ds = make(folder, [rec("a"), rec("t", value="Hi", answer="Cat", image=None)], tokenizer, template="plain",
              model_max_length=N_IMG, name="u.jsonl")
    s = ds[0]
    assert s["num_skipped"] == 1 and dict(ds.skipped) == {"image_truncated": 1}
    assert s["pixel_values"] is None


def test_collator_pads_and_stacks(folder, tokenizer):
    ds = make(folder, [rec("a"), rec("t", value="Hi", answer="Cat", image=None), rec("b", answer="Blue.")], tokenizer)
    items = [ds[0], ds[1], ds[2]]
    coll = DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id, model_max_length=2048)
    b = coll(items)
    T = max(len(x["input_ids"]) for x in items)
    assert set(b) == {"input_ids", "labels", "attention_mask", "pixel_values"}
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, T)
    assert b["pixel_values"].shape == (2, 3, 16, 16)
    n1 = len(items[1]["input_ids"])
    assert b["attention_mask"][1].tolist() == [1] * n1 + [0] * (T - n1)
    assert (b["input_ids"][1, n1:] == tokenizer.pad_token_id).all() and (b["labels"][1, n1:] == IGNORE_INDEX).all()
    assert b["input_ids"][1, :n1].tolist() == items[1]["input_ids"].tolist()
    text_only = coll([items[1], items[1]])
    assert "pixel_values" not in text_only
    rep = DataCollatorForSupervisedDataset(0, 2048, report_skipped=True)([dict(items[0], num_skipped=2), items[1]])
    assert rep["num_skipped"].item() == 2


def test_modality_sampler_groups_megabatches():
    lengths = [(i % 7) + 1 if i % 3 else -((i % 5) + 1) for i in range(103)]
    bs, ws = 4, 2
    order = list(LengthGroupedSampler(bs, ws, lengths, seed=3))
    assert sorted(order) == list(range(103))
    assert order == list(LengthGroupedSampler(bs, ws, lengths, seed=3))
    s = LengthGroupedSampler(bs, ws, lengths, seed=3)
    s.set_epoch(1)
    assert list(s) != order
    mb = bs * ws
    n_mm, n_lang = sum(x > 0 for x in lengths), sum(x < 0 for x in lengths)
    full = (n_mm // mb) + (n_lang // mb) - (n_mm % mb == 0) - (n_lang % mb == 0)
    mixed_seen = 0
    for k in range(0, len(order), mb):
        signs = {lengths[i] > 0 for i in order[k:k + mb]}
        mixed_seen += len(signs) > 1
        if k // mb < full:
            assert len(signs) == 1, f"megabatch {k // mb} mixes modalities"
    assert mixed_seen <= 1
    with pytest.raises(ValueError):
        get_modality_length_grouped_indices([1, 0, -1], 1, 1)
