"""Runner: resume after a crash, error records, sharding + merge == unsharded, LLaVA chunking, torchrun env."""
import base64
import json

import pytest
from eval_fixtures import FakeEngine
from PIL import Image

from piip_llava.evaluation.runner import (QuestionRecord, ShardSpec, chunk_answers_path, get_chunk,
                                          image_from_base64, image_from_file, merge_chunks, read_answers,
                                          resolve_shard, run_generation)


def _questions(tmp_path, n=10):
    img = tmp_path / "img.png"
    Image.new("RGB", (30, 20), (1, 2, 3)).save(img)
    # ids repeat on purpose (TextVQA: question_id is the image id); the prompt tells questions apart
    return [QuestionRecord(question_id=f"img{i // 2}", prompt=f"q{i}?\nAnswer.", message=f"q{i}?" + "x" * i,
                           image=image_from_file(img) if i % 3 else None, extra={"category": "default"})
            for i in range(n)]


def _texts(path):
    return [(r["question_id"], r["prompt"], r["text"]) for r in read_answers(path)]


def test_answers_format_and_order(tmp_path):
    qs = _questions(tmp_path, 5)
    eng = FakeEngine()
    out = tmp_path / "a.jsonl"
    s = run_generation(qs, eng, out, batch_size=2, progress=False, model_id="m")
    recs = read_answers(out)
    assert [r["prompt"] for r in recs] == [q.prompt for q in qs]
    assert set(recs[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata", "category"}
    assert recs[0]["text"] == "3|None" and recs[1]["text"] == "4|((30, 20), 'RGB')"  # stripped output
    assert recs[0]["model_id"] == "m" and recs[0]["metadata"] == {}
    assert [len(c) for c in eng.calls] == [2, 2, 1]
    assert s["answered"] == 5 and s["errors"] == 0 and s["already_answered"] == 0


def test_resume_after_crash_does_not_reask(tmp_path):
    qs = _questions(tmp_path, 10)
    out = tmp_path / "a.jsonl"
    crashing = FakeEngine(fail_after_calls=2)
    with pytest.raises(KeyboardInterrupt):
        run_generation(qs, crashing, out, batch_size=3, progress=False)
    assert len(read_answers(out)) == 6  # two full batches were flushed before the crash
    # a half-written line from the crash must be dropped and its question re-asked
    with open(out, "a") as f:
        f.write('{"question_id": "img3", "prompt": "q6?\\nAnswer.", "te')
    eng = FakeEngine()
    s = run_generation(qs, eng, out, batch_size=3, progress=False)
    assert eng.asked == [q.message for q in qs[6:]]
    assert s["already_answered"] == 6 and s["answered"] == 4
    full = tmp_path / "full.jsonl"
    run_generation(qs, FakeEngine(), full, batch_size=3, progress=False)
    assert _texts(out) == _texts(full)
    # third run: nothing left to ask
    eng3 = FakeEngine()
    s3 = run_generation(qs, eng3, out, batch_size=3, progress=False)
    assert eng3.calls == [] and s3["already_answered"] == 10 and len(read_answers(out)) == 10


def test_error_records_not_crash(tmp_path):
    good = tmp_path / "ok.png"
    Image.new("L", (8, 6)).save(good)
    qs = [
        QuestionRecord(1, "p1", "m1", image=image_from_file(good)),
        QuestionRecord(2, "p2", "m2", image=image_from_file(tmp_path / "missing.jpg")),
        QuestionRecord(3, "p3", "m3", image=image_from_base64("!!!not base64!!!", source="row 3")),
        QuestionRecord(4, "p4", "m4", image=image_from_base64(base64.b64encode(b"GIF89a junk").decode())),
        QuestionRecord("row5", "", "", error="bad.tsv: row 5: field 'index' is not an integer"),
        QuestionRecord(6, "p6", "m6"),
    ]
    eng = FakeEngine()
    out = tmp_path / "a.jsonl"
    s = run_generation(qs, eng, out, batch_size=4, progress=False)
    recs = read_answers(out)
    assert [r["question_id"] for r in recs] == [1, 2, 3, 4, "row5", 6]
    assert [bool(r.get("error")) for r in recs] == [False, True, True, True, True, False]
    assert "missing.jpg" in recs[1]["error"] and "row 3" in recs[2]["error"]
    assert recs[4]["error"].endswith("field 'index' is not an integer") and recs[4]["text"] == ""
    assert recs[0]["text"] == "2|((8, 6), 'RGB')"  # grayscale converted to RGB by the loader
    assert s["errors"] == 4 and s["error_ids"] == [2, 3, 4, "row5"] and s["answered"] == 2
    assert eng.asked == ["m1", "m6"]
    # error records are not re-asked on resume unless retry_errors
    eng2 = FakeEngine()
    assert run_generation(qs, eng2, out, progress=False)["already_answered"] == 6 and eng2.calls == []


def test_llava_chunking():
    items = list(range(10))
    assert [get_chunk(items, 4, k) for k in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [len(get_chunk(list(range(9)), 4, k)) for k in range(4)] == [3, 3, 3, 0]
    assert get_chunk(items, 1, 0) == items


def test_resolve_shard_from_torchrun_env():
    assert resolve_shard(1, 0, env={"WORLD_SIZE": "4", "RANK": "2"}) == ShardSpec(4, 2)
    assert resolve_shard(3, 1, env={"WORLD_SIZE": "4", "RANK": "2"}) == ShardSpec(3, 1)  # explicit wins
    assert resolve_shard(1, 0, env={}) == ShardSpec(1, 0)
    with pytest.raises(ValueError):
        ShardSpec(2, 2)
    assert chunk_answers_path("o/a.jsonl", ShardSpec(4, 2)).name == "a.chunk2of4.jsonl"


def test_sharded_then_merged_equals_unsharded(tmp_path):
    qs = _questions(tmp_path, 11)
    full = tmp_path / "full.jsonl"
    run_generation(qs, FakeEngine(), full, batch_size=4, progress=False)
    merged = tmp_path / "sharded" / "answers.jsonl"
    with pytest.raises(FileNotFoundError, match="not finished"):
        merge_chunks(merged, 3)
    asked = []
    for k in range(3):
        shard = ShardSpec(3, k)
        eng = FakeEngine()
        run_generation(qs, eng, chunk_answers_path(merged, shard), batch_size=2, shard=shard, progress=False)
        asked += eng.asked
    assert asked == [q.message for q in qs]  # every question asked exactly once across shards
    info = merge_chunks(merged, 3)
    assert info["num_records"] == 11
    assert _texts(merged) == _texts(full)


def test_bad_line_in_middle_of_answers_file_is_an_error(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"question_id": 1}\nnot json\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match="a.jsonl:2"):
        read_answers(p)
    assert json.loads(p.read_text().splitlines()[0]) == {"question_id": 1}


def test_resume_appends_after_file_without_final_newline(tmp_path):
    qs = [QuestionRecord(i, f"p{i}", f"m{i}") for i in range(3)]
    out = tmp_path / "a.jsonl"
    out.write_text('{"question_id": 0, "prompt": "p0", "text": "old"}')  # e.g. written by another tool
    eng = FakeEngine()
    run_generation(qs, eng, out, progress=False)
    assert eng.asked == ["m1", "m2"]
    assert [(r["question_id"], r["text"]) for r in read_answers(out)] == [(0, "old"), (1, "2|None"), (2, "2|None")]


def test_prompt_too_long_becomes_error_record_not_crash(tmp_path):
    class PickyEngine(FakeEngine):
        def generate(self, requests, **kw):
            if any("LONG" in r.messages[0]["content"] for r in requests):
                raise ValueError("the prompt needs 5000 tokens, over the model's context of 2048")
            return super().generate(requests, **kw)

    qs = [QuestionRecord(i, f"p{i}", "LONG" if i == 2 else f"m{i}") for i in range(4)]
    eng = PickyEngine()
    s = run_generation(qs, eng, tmp_path / "a.jsonl", batch_size=4, progress=False)
    recs = read_answers(tmp_path / "a.jsonl")
    assert [r.get("error", "")[:10] for r in recs] == ["", "", "ValueError", ""]
    assert [r["text"] for r in recs] == ["2|None", "2|None", "", "2|None"]
    assert s["errors"] == 1 and s["error_ids"] == [2] and eng.asked == ["m0", "m1", "m3"]


def test_retry_errors_replaces_error_records(tmp_path):
    img = tmp_path / "late.png"
    qs = [QuestionRecord(0, "p0", "m0"), QuestionRecord(1, "p1", "m1", image=image_from_file(img))]
    out = tmp_path / "a.jsonl"
    assert run_generation(qs, FakeEngine(), out, progress=False)["errors"] == 1
    Image.new("RGB", (4, 4)).save(img)  # the missing image appears
    eng = FakeEngine()
    s = run_generation(qs, eng, out, progress=False, retry_errors=True)
    assert eng.asked == ["m1"] and s["answered"] == 1
    assert [(r["question_id"], r["text"], "error" in r) for r in read_answers(out)] == [
        (0, "2|None", False), (1, "2|((4, 4), 'RGB')", False)]
