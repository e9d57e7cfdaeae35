"""Mixture tool on a generated 100k-record input: counts, sampling, report and dropped reasons."""
import json

from PIL import Image

from piip_llava.data.mixture import iter_records, main


def test_mixture_100k(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    Image.new("RGB", (4, 4)).save(img / "a.png")
    n = 100_000
    recs = []
    for i in range(n):
        r = {"id": f"r{i}", "image": "a.png",
             "conversations": [{"from": "human", "value": f"<image>\nQ {i}?"}, {"from": "gpt", "value": "A."}]}
        if i % 1000 == 1:
            r["image"] = "missing.png"
        elif i % 1000 == 2:
            r["conversations"] = r["conversations"][:1]
        elif i % 1000 == 3:
            r["conversations"][0]["value"] = "<image><image>"
        elif i % 1000 == 4:
            del r["image"]
            r["conversations"][0]["value"] = "text only"
        recs.append(r)
    (tmp_path / "a.json").write_text(json.dumps(recs))
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(1000):
            f.write(json.dumps({"id": f"b{i}", "conversations": [{"from": "human", "value": "hi"},
                                                                 {"from": "gpt", "value": "yo"}]}) + "\n")
        f.write("{broken\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
seed: 1
image_folder: {img}
stages:
  pretrain:
    sources:
      - {{name: a, file: a.json, image_root: imgs, template: plain}}
  finetune:
    sources:
      - {{name: a_half, file: a.json, image_root: imgs, template: vicuna_v1, weight: 0.5}}
      - {{name: b_up, file: b.jsonl, template: vicuna_v1, count: 2500}}
""")
    out = tmp_path / "out"
    assert main([str(recipe), "--out", str(out), "--root", str(tmp_path), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    a = rep["stages"]["pretrain"]["sources"][0]
    assert a["read"] == n
    assert a["dropped"] == {"missing_image": 100, "no_assistant_turn": 100, "image_tags": 100}
    assert a["valid"] == a["written"] == n - 300
    pre = [json.loads(x) for x in (out / "pretrain.jsonl").read_text().splitlines()]
    assert len(pre) == n - 300 and pre[0]["id"] == "r0" and pre[0]["image"] == "a.png" and pre[0]["source"] == "a"
    assert "image" not in pre[4 - 3]  # r4 (text-only) kept after r1..r3 were dropped
    fin = rep["stages"]["finetune"]
    half, up = fin["sources"]
    assert half["written"] == round(0.5 * (n - 300)) and not half["upsampled"]
    assert up["read"] == 1001 and up["dropped"] == {"bad_json": 1} and up["written"] == 2500 and up["upsampled"]
    lines = (out / "finetune.jsonl").read_text().splitlines()
    assert len(lines) == fin["written"] == half["written"] + 2500
    ids = [json.loads(x)["id"] for x in lines]
    assert len(set(ids[: half["written"]])) == half["written"]  # sampled without replacement
    b_ids = ids[half["written"]:]
    assert len(set(b_ids)) == 1000 and all(2 <= b_ids.count(f"b{i}") <= 3 for i in range(0, 1000, 97))
    dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == 300 + 300 + 1
    assert {"stage": "pretrain", "source": "a", "id": "r1001", "index": 1001, "line": 1, "reason": "missing_image"} \
        in dropped
    md = (out / "report.md").read_text()
    assert "| a | 100,000 | 99,700 | 300 | 99,700 | image_tags: 100, missing_image: 100, no_assistant_turn: 100 |" in md
    assert "(upsampled)" in md
    # deterministic with the seed
    main([str(recipe), "--out", str(tmp_path / "out2"), "--root", str(tmp_path), "--no-progress"])
    assert (tmp_path / "out2" / "finetune.jsonl").read_text() == (out / "finetune.jsonl").read_text()
    # the output is itself a valid LLaVA JSONL file
    assert sum(1 for r in iter_records(str(out / "finetune.jsonl")) if r.error is None) == len(lines)
