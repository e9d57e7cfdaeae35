"""Resume with provenance: answers written by one model/settings are never reused for another."""
import json

import pytest
from eval_fixtures import FakeEngine

from piip_llava.evaluation import provenance as prov_mod
from piip_llava.evaluation.provenance import (ProvenanceMismatch, checkpoint_fingerprint, fingerprint,
                                              read_provenance)
from piip_llava.evaluation.runner import (QuestionRecord, ShardSpec, chunk_answers_path, merge_chunks, read_answers,
                                          run_generation)


def _qs(n=6):
    return [QuestionRecord(question_id=i, prompt=f"q{i}", message=f"question {i}") for i in range(n)]


def _prov(fp="aaaa", template="vicuna_v1", dtype="float32", max_new_tokens=8, ocr=True):
    return {"task": "textvqa", "backend": "local", "checkpoint": {"path": "/x", "fingerprint": fp},
            "template": template, "dtype": dtype, "image_decode": "official",
            "generation": {"max_new_tokens": max_new_tokens, "temperature": 0.0},
            "prompt_options": {"ocr": ocr}, "run": {"batch_size": 1}}


def test_lines_and_sidecar_carry_the_provenance(tmp_path):
    out = tmp_path / "a.jsonl"
    run_generation(_qs(), FakeEngine(), out, provenance=_prov(), progress=False)
    recs = read_answers(out)
    assert {r["metadata"]["provenance"] for r in recs} == {fingerprint(_prov())}
    side = read_provenance(out)
    assert side["checkpoint"]["fingerprint"] == "aaaa" and side["fingerprint"] == fingerprint(_prov())
    # batch size is recorded but does not change the fingerprint
    assert fingerprint({**_prov(), "run": {"batch_size": 16}}) == fingerprint(_prov())


def test_same_provenance_resumes_and_counts_reused(tmp_path):
    out = tmp_path / "a.jsonl"
    run_generation(_qs(4), FakeEngine(), out, provenance=_prov(), progress=False)
    eng = FakeEngine()
    s = run_generation(_qs(6), eng, out, provenance=_prov(), progress=False)
    assert s["already_answered"] == 4 and s["answered"] == 2
    assert eng.asked == ["question 4", "question 5"]


@pytest.mark.parametrize("change,field", [
    ({"fp": "bbbb"}, "checkpoint.fingerprint: 'aaaa' (answers file) vs 'bbbb' (this run)"),
    ({"template": "llama3"}, "template: 'vicuna_v1' (answers file) vs 'llama3' (this run)"),
    ({"dtype": "float16"}, "dtype: 'float32'"),
    ({"max_new_tokens": 16}, "generation.max_new_tokens: 8"),
    ({"ocr": False}, "prompt_options.ocr: True"),
])
def test_different_provenance_is_refused_naming_the_field(tmp_path, change, field):
    out = tmp_path / "a.jsonl"
    run_generation(_qs(3), FakeEngine(), out, provenance=_prov(), progress=False)
    before = out.read_text()
    eng = FakeEngine()
    with pytest.raises(ProvenanceMismatch) as exc:
        run_generation(_qs(3), eng, out, provenance=_prov(**change), progress=False)
    msg = str(exc.value)
    assert field in msg and "--overwrite" in msg
    assert eng.asked == [] and out.read_text() == before  # nothing asked, nothing written


def test_overwrite_starts_fresh(tmp_path):
    out = tmp_path / "a.jsonl"
    run_generation(_qs(3), FakeEngine(), out, provenance=_prov(), progress=False)
    eng = FakeEngine()
    s = run_generation(_qs(3), eng, out, provenance=_prov(fp="bbbb"), overwrite=True, progress=False)
    assert s["already_answered"] == 0 and len(eng.asked) == 3
    recs = read_answers(out)
    assert len(recs) == 3 and {r["metadata"]["provenance"] for r in recs} == {fingerprint(_prov(fp="bbbb"))}
    assert read_provenance(out)["checkpoint"]["fingerprint"] == "bbbb"


def test_file_without_provenance_is_refused(tmp_path):
    out = tmp_path / "llava.jsonl"  # written by LLaVA's model_vqa_loader: metadata {}
    out.write_text(json.dumps({"question_id": 0, "prompt": "q0", "text": "x", "metadata": {}}) + "\n")
    with pytest.raises(ProvenanceMismatch, match="1 of 1 answers carry no provenance"):
        run_generation(_qs(2), FakeEngine(), out, provenance=_prov(), progress=False)


def test_missing_sidecar_still_refuses_with_the_run_ids(tmp_path):
    out = tmp_path / "a.jsonl"
    run_generation(_qs(2), FakeEngine(), out, provenance=_prov(), progress=False)
    prov_mod.provenance_path(out).unlink()
    with pytest.raises(ProvenanceMismatch, match=fingerprint(_prov())):
        run_generation(_qs(2), FakeEngine(), out, provenance=_prov(fp="cccc"), progress=False)


def test_merge_refuses_chunks_of_different_runs_and_keeps_provenance(tmp_path):
    out = tmp_path / "m.jsonl"
    for k, fp in enumerate(("aaaa", "aaaa")):
        shard = ShardSpec(2, k)
        run_generation(_qs(4), FakeEngine(), chunk_answers_path(out, shard), shard=shard,
                       provenance=_prov(fp=fp), progress=False)
    merge_chunks(out, 2)
    assert len(read_answers(out)) == 4 and read_provenance(out)["fingerprint"] == fingerprint(_prov())
    shard = ShardSpec(2, 1)
    run_generation(_qs(4), FakeEngine(), chunk_answers_path(out, shard), shard=shard, provenance=_prov(fp="bbbb"),
                   overwrite=True, progress=False)
    with pytest.raises(ValueError, match="different runs"):
        merge_chunks(out, 2)


def test_checkpoint_fingerprint_follows_content_not_path(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text('{"x": 1}')
        (d / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
        (d / "eval_answers.jsonl").write_text("ignored\n")  # not part of the identity
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(b)
    (b / "eval_answers.jsonl").write_text("changed\n")
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(b)
    data = bytearray((b / "model.safetensors").read_bytes())
    data[1234] ^= 1
    (b / "model.safetensors").write_bytes(bytes(data))
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(b)
    # large files are sampled: a change inside a sampled block is seen, the size always is
    monkeypatch.setattr(prov_mod, "_FULL_HASH_MAX", 1000)
    monkeypatch.setattr(prov_mod, "_BLOCK", 100)
    base = checkpoint_fingerprint(a)
    (a / "model.safetensors").write_bytes(bytes(range(256)) * 1000 + b"x")
    assert checkpoint_fingerprint(a) != base
    with pytest.raises(FileNotFoundError):
        checkpoint_fingerprint(tmp_path / "nope")
