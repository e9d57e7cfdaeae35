"""The skeleton with real tiny checkpoints: resume refuses another model's answers (the quickstart re-run), and the
OpenAI backend against our own API server gives the in-process greedy answers."""
import json
import shutil

import pytest

from piip_llava.evaluation.cli import task_main
from piip_llava.evaluation.provenance import checkpoint_fingerprint
from piip_llava.evaluation.runner import read_answers

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _common(fx, max_new_tokens=4):
    return ["--question-file", str(fx["questions"]), "--image-folder", str(fx["images"]), "--annotation-file",
            str(fx["annotations"]), "--max-new-tokens", str(max_new_tokens), "--no-progress"]


def _texts(path):
    return [(r["question_id"], r["prompt"], r["text"]) for r in read_answers(path)]


def test_retrained_checkpoint_in_same_folder_is_not_scored_with_old_answers(tmp_path, tokenizer_dir, textvqa_fixture,
                                                                           capsys):
    """The quickstart re-run: a new model trained into the same folder, evaluated into the same answers file."""
    from piip_llava.testing import build_tiny_checkpoint

    main = task_main("textvqa")
    ckpt = tmp_path / "run" / "stage2"
    build_tiny_checkpoint(str(ckpt), seed=0, tokenizer_dir=tokenizer_dir)
    answers = tmp_path / "eval" / "textvqa_answers.jsonl"
    common = _common(textvqa_fixture) + ["--model-path", str(ckpt), "--answers-file", str(answers),
                                         "--batch-size", "16"]
    assert main(common) == 0
    first = _texts(answers)
    fp_first = checkpoint_fingerprint(ckpt)

    shutil.rmtree(ckpt)
    build_tiny_checkpoint(str(ckpt), seed=1, tokenizer_dir=tokenizer_dir)  # "retrained"
    capsys.readouterr()
    assert main(common) == 2  # refused: same path, different weights
    err = capsys.readouterr().err
    assert f"checkpoint.fingerprint: '{fp_first}' (answers file) vs '{checkpoint_fingerprint(ckpt)}'" in err
    assert "--overwrite" in err and _texts(answers) == first

    assert main(common + ["--overwrite"]) == 0
    fresh = tmp_path / "fresh" / "answers.jsonl"
    assert main(_common(textvqa_fixture) + ["--model-path", str(ckpt), "--answers-file", str(fresh),
                                            "--batch-size", "16"]) == 0
    assert _texts(answers) == _texts(fresh) != first  # the new model's answers, scored as such
    summary = json.loads((answers.parent / "textvqa_summary.json").read_text())
    assert summary["provenance"]["checkpoint"]["fingerprint"] == checkpoint_fingerprint(ckpt)
    assert summary["score"] == json.loads((fresh.parent / "textvqa_summary.json").read_text())["score"]

    capsys.readouterr()
    assert main(common) == 0  # same model again: resumed, nothing re-asked
    assert "reused 20 of 20 answers" in capsys.readouterr().out


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_dir):
    from piip_llava.serve.api import create_app
    from piip_llava.serve.inference import InferenceEngine
    from piip_llava.testing import build_tiny_checkpoint, serve_in_thread

    ckpt = build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), tokenizer_dir=tokenizer_dir, gate_scale=0.5)
    engine = InferenceEngine.load(ckpt, device="cpu", dtype="float32")
    with serve_in_thread(create_app(engine, "tiny")) as base:
        yield ckpt, f"{base}/v1"


def test_openai_backend_equals_in_process_greedy(served, textvqa_fixture, tmp_path, capsys):
    ckpt, url = served
    main = task_main("textvqa")
    local = tmp_path / "local" / "textvqa.jsonl"
    remote = tmp_path / "remote" / "textvqa.jsonl"
    assert main(_common(textvqa_fixture, 6) + ["--model-path", ckpt, "--answers-file", str(local)]) == 0
    assert main(_common(textvqa_fixture, 6) + ["--backend", "openai", "--base-url", url, "--concurrency", "4",
                                               "--answers-file", str(remote)]) == 0
    assert _texts(remote) == _texts(local)
    assert any(t for _, _, t in _texts(local))
    summary = json.loads((remote.parent / "textvqa_summary.json").read_text())
    assert summary["provenance"]["server"] == {"base_url": url, "model": "tiny"}
    assert summary["score"] == json.loads((local.parent / "textvqa_summary.json").read_text())["score"]
    # resume through the server: nothing re-asked; other settings refused
    capsys.readouterr()
    assert main(_common(textvqa_fixture, 6) + ["--backend", "openai", "--base-url", url,
                                               "--answers-file", str(remote)]) == 0
    assert "reused 20 of 20 answers" in capsys.readouterr().out
    assert main(_common(textvqa_fixture, 5) + ["--backend", "openai", "--base-url", url,
                                               "--answers-file", str(remote)]) == 2


def test_openai_backend_refused_request_becomes_error_record(served, textvqa_fixture, tmp_path):
    _, url = served
    out = tmp_path / "too_long.jsonl"
    assert task_main("textvqa")(_common(textvqa_fixture, 100_000) + [
        "--backend", "openai", "--base-url", url, "--answers-file", str(out)]) == 0
    recs = read_answers(out)
    assert len(recs) == 20 and all(r["error"].startswith("ValueError: server refused the request (400)")
                                   for r in recs)
