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


def _records(n):
    return [{"id": f"r{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a thing"}]} for i in range(n)]


def _read_all(path, block_size=1 << 24):
    return [r.obj for r in iter_records(str(path), block_size=block_size)]


def test_broken_element_of_an_indented_array_is_named_at_its_own_line(tmp_path):
    """LLaVA's files are `json.dump(..., indent=2)`: record 7 loses a comma; the message names record 7, its id, the
    line where it starts and the line and column where reading stopped (both inside it), not the end of the file."""
    import pytest

    from piip_llava.data.mixture import DataFormatError

    lines = json.dumps(_records(12), indent=2).split("\n")
    start = next(i for i, line in enumerate(lines) if '"id": "r7"' in line) - 1  # the line of its `{`
    lines[start + 2] = lines[start + 2].rstrip(",")  # `"image": "7.png"` without its comma
    path = tmp_path / "indented.json"
    path.write_text("\n".join(lines) + "\n")
    for block_size in (64, 1 << 24):  # a window that ends inside the record reads the same
        with pytest.raises(DataFormatError) as e:
            _read_all(path, block_size)
        msg = str(e.value)
        assert msg.startswith(f'{path}: record 7 (id "r7"), starting at line {start + 1}, is not valid JSON: '
                              f"Expecting ',' delimiter at line {start + 4}, column 5"), msg
        assert start + 4 < len(lines) - 2  # its own lines, well before the end of the file


def test_broken_element_of_a_one_record_per_line_array(tmp_path):
    import pytest

    from piip_llava.data.mixture import DataFormatError

    rows = [json.dumps(r) for r in _records(30)]
    rows[21] = rows[21].replace('"image": "21.png"', '"image": 21.png"')
    path = tmp_path / "rows.json"
    path.write_text("[\n" + ",\n".join(rows) + "\n]\n")
    with pytest.raises(DataFormatError, match=r'record 21 \(id "r21"\), starting at line 23, is not valid JSON: '
                                              r"Expecting ',' delimiter at line 23, column 26"):
        _read_all(path)


def test_training_exits_1_with_the_data_error_and_no_traceback(tmp_path, tokenizer_dir, capsys):
    from piip_llava.train.train import main

    rows = [json.dumps(r) for r in _records(5)]
    rows[3] = rows[3][:-1]  # the closing brace of record 3 is gone
    data = tmp_path / "bad.json"
    data.write_text("[\n" + ",\n".join(rows) + "\n]\n")
    argv = ["--stage", "2", "--preset", "tiny-piip2_clip_64-128", "--tokenizer_path", tokenizer_dir,
            "--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]
    assert main(argv) == 1
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.strip() and "reading " not in line]  # not the progress bar
    assert "Traceback" not in stderr
    assert len(err) == 1 and err[0].startswith(f'error: {data}: record 3 (id "r3"), starting at line 5, is not valid '
                                               "JSON"), err
