"""The registry and the skeleton: one module + one line per task, one-line shims, one flag vocabulary, the report
reading the registry (server-graded scores, local marks), question-order scoring, official image decoding."""
import ast
import json
from pathlib import Path

import pytest
from eval_fixtures import FakeEngine
from PIL import Image

from piip_llava.evaluation.cli import build_parser, main
from piip_llava.evaluation.report import main as report_main
from piip_llava.evaluation.report import paper_columns
from piip_llava.evaluation.runner import QuestionRecord, image_from_file, read_answers, run_generation
from piip_llava.evaluation.tasks import TASKS, all_tasks, get_task

REPO = Path(__file__).resolve().parents[2]


def test_every_task_is_one_module_with_a_shim():
    for task in all_tasks():
        assert TASKS[task.name] == f"piip_llava.evaluation.tasks.{task.name}"
        shim = (REPO / "eval" / f"{task.name}.py").read_text()
        tree = ast.parse(shim)
        assert "sys.path" not in shim and len([n for n in tree.body if isinstance(n, ast.ImportFrom)]) == 1
        assert f'main = task_main("{task.name}")' in shim
        for flag in ("--model-path", "--conv-mode", "--dtype", "--score-only", "--backend", "--overwrite"):
            assert flag in build_parser(task).format_help(), (task.name, flag)


def test_paper_columns_come_from_the_registry():
    assert paper_columns() == [("MMB-EN", "mmbench"), ("MMVet", "mmvet"), ("TextVQA", "textvqa"),
                               ("SQA-I", "scienceqa"), ("GQA", "gqa"), ("VQAv2", "vqav2"), ("SEED-I", "seed"),
                               ("POPE", "pope")]


def test_one_flag_vocabulary():
    p = build_parser(get_task("textvqa"))
    a = p.parse_args(["--model", "ckpt", "--annotation-file", "x", "--dtype", "fp16"])
    assert a.model_path == "ckpt" and a.dtype == "fp16" and a.score_only is False and a.image_decode == "official"
    assert p.parse_args(["--annotation-file", "x", "--score-only"]).score_only is True
    assert p.parse_args(["--annotation-file", "x", "--score-only", "a.jsonl"]).score_only == "a.jsonl"
    with pytest.raises(SystemExit):
        p.parse_args(["--annotation-file", "x", "--dtype", "half"])


def test_entry_point_lists_tasks_and_refuses_unknown(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in TASKS)
    assert main(["nope"]) == 2


def test_openai_backend_needs_url_and_refuses_local_settings(tmp_path):
    run = get_task("textvqa")
    from piip_llava.evaluation.cli import task_main

    with pytest.raises(SystemExit):
        task_main("textvqa")(["--annotation-file", "x", "--answers-file", str(tmp_path / "a.jsonl"),
                              "--backend", "openai"])
    with pytest.raises(SystemExit):
        task_main(run.name)(["--annotation-file", "x", "--answers-file", str(tmp_path / "a.jsonl"),
                             "--backend", "openai", "--base-url", "http://127.0.0.1:9", "--dtype", "fp16"])


def test_report_takes_server_scores_and_marks_local_ones(tmp_path, capsys):
    from piip_llava.evaluation.report import PAPER_ROWS

    vals = PAPER_ROWS["LLaVA-1.5 7B (CLIP-L 336)"]
    for (_, name), v in zip(paper_columns(), vals):
        if name not in ("vqav2", "mmvet"):
            s = {"benchmark": name, "score": v}
            if name == "mmbench":
                s["scored_by"] = "local"
            (tmp_path / f"{name}_summary.json").write_text(json.dumps(s))
    (tmp_path / "vqav2_summary.json").write_text(json.dumps({"benchmark": "vqav2", "score": None}))
    assert report_main([str(tmp_path), "--name", "ours", "--no-files"]) == 0
    out = capsys.readouterr().out
    assert "| ours | 64.3* | - | 58.2 |" in out and "no score for: mmvet, vqav2" in out
    assert report_main([str(tmp_path), "--name", "ours", "--no-files", "--server-score", "vqav2=78.5",
                        "--server-score", "mmvet=31.1", "--server-score", "mmbench=64.3"]) == 0
    out = capsys.readouterr().out
    assert "| ours | 64.3 | 31.1 | 58.2 | 66.8 | 62.0 | 78.5 | 66.1 | 85.9 | 64.1 |" in out
    assert report_main([str(tmp_path), "--name", "ours", "--no-files", "--server-score", "vqav2=78.5",
                        "--server-score", "mmvet=31.1"]) == 0
    assert "| 85.9 | 64.1* |" in capsys.readouterr().out  # Avg includes the local MMBench number
    with pytest.raises(SystemExit):
        report_main([str(tmp_path), "--server-score", "nope=1"])
    assert not (tmp_path / "report.csv").exists()


def _pope_fixture(tmp_path):
    img = tmp_path / "img.jpg"
    Image.new("RGB", (20, 20)).save(img)
    qs = [{"question_id": i, "image": "img.jpg", "text": f"Is there a thing {i}?", "category": cat}
          for i, cat in enumerate(["random"] * 4 + ["popular"] * 2)]
    qf = tmp_path / "q.jsonl"
    qf.write_text("".join(json.dumps(q) + "\n" for q in qs))
    ann = tmp_path / "coco"
    ann.mkdir()
    labels = {"random": ["yes", "no", "yes", "no"], "popular": ["yes", "no"]}
    for cat, ls in labels.items():
        (ann / f"coco_pope_{cat}.json").write_text("".join(json.dumps({"label": l}) + "\n" for l in ls))
    return qf, ann


class _YesNoEngine:
    """Answers by question number: even -> Yes, odd -> No (right for every label); fails question 2 once."""

    def __init__(self, fail=frozenset()):
        self.fail = set(fail)

    def generate(self, requests, **kw):
        out = []
        for r in requests:
            n = int(r.messages[0]["content"].split()[-1].rstrip("?"))
            out.append(ValueError("boom") if n in self.fail else ("Yes" if n % 2 == 0 else "No"))
        return out


def test_pope_after_retry_errors_is_scored_in_question_order(tmp_path):
    from piip_llava.evaluation.io import load_question_jsonl
    from piip_llava.evaluation.tasks.pope import score_pope

    qf, ann = _pope_fixture(tmp_path)
    out = tmp_path / "a.jsonl"
    qs = load_question_jsonl(qf, tmp_path)
    run_generation(qs, _YesNoEngine(fail={2}), out, progress=False)
    assert score_pope(out, qf, ann)["per_category"]["random"]["errors"] == 1
    run_generation(qs, _YesNoEngine(), out, retry_errors=True, progress=False)
    assert [r["question_id"] for r in read_answers(out)] == [0, 1, 2, 3, 4, 5]  # rewritten in question order
    s = score_pope(out, qf, ann)
    assert s["mean_f1"] == 100.0 and s["per_category"]["random"]["errors"] == 0
    # even a shuffled file scores by question id, not position
    recs = read_answers(out)[::-1]
    assert score_pope(recs, qf, ann)["mean_f1"] == 100.0


def test_mmbench_unloadable_rows_count_as_wrong(mmbench_fixture):
    from piip_llava.evaluation.tasks.mmbench import load_mmbench_tsv, score_mmbench

    rows, errors = load_mmbench_tsv(mmbench_fixture["tsv"])
    answers = [{"question_id": r.index, "text": r.answer} for r in rows]
    perfect = score_mmbench(rows, answers)
    assert perfect["circular"] == 100.0 and perfect["rows"] == 20
    # drop one circular copy of question 0 (as if its row failed to load) and one row with an unreadable index
    copy = next(r for r in rows if r.index == 1_000_000)
    kept = [r for r in rows if r is not copy]
    errs = [{"row": 7, "index": copy.index, "error": "bad image"}, {"row": 30, "index": "row30", "error": "bad"}]
    s = score_mmbench(kept, answers, load_errors=errs)
    assert s["rows"] == 21 and s["questions"] == 7 and s["unloadable_rows"] == 2
    assert s["vanilla"] == pytest.approx(100 * 19 / 21) and s["circular"] == pytest.approx(100 * 5 / 7)


def test_eval_images_are_decoded_as_the_official_loaders(tmp_path):
    # an RGBA PNG with a fully transparent red pixel and an EXIF-rotated JPEG
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    jpg = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    jpg.save(tmp_path / "r.jpg", exif=exif.tobytes())
    official = image_from_file(tmp_path / "t.png")()
    friendly = image_from_file(tmp_path / "t.png", decode="friendly")()
    assert official.getpixel((0, 0)) == (255, 0, 0) and friendly.getpixel((0, 0)) == (255, 255, 255)
    assert image_from_file(tmp_path / "r.jpg")().size == (40, 20)
    assert image_from_file(tmp_path / "r.jpg", decode="friendly")().size == (20, 40)
    # the answers record which decoding produced them
    q = [QuestionRecord(0, "p", "m", image=image_from_file(tmp_path / "r.jpg"))]
    eng = FakeEngine()
    run_generation(q, eng, tmp_path / "a.jsonl", progress=False)
    assert read_answers(tmp_path / "a.jsonl")[0]["text"] == "1|((40, 20), 'RGB')"


def test_training_data_uses_official_decoding(tmp_path, tokenizer):
    import torch

    from piip_llava.data.dataset import LazySupervisedDataset
    from piip_llava.models.processing_piip_llava import PiipLlavaImageProcessor, load_image

    Image.new("RGBA", (8, 6), (255, 0, 0, 0)).save(tmp_path / "t.png")  # transparent red
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "a", "image": "t.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}]))
    ds = LazySupervisedDataset(str(data), tokenizer, PiipLlavaImageProcessor(), image_token_id=len(tokenizer),
                               num_image_tokens=4, image_folder=str(tmp_path), progress=False)
    got = ds[0]["pixel_values"]
    proc = PiipLlavaImageProcessor()
    official = proc.pixel_values([load_image(str(tmp_path / "t.png"), decode="official")])[0]
    friendly = proc.pixel_values([load_image(str(tmp_path / "t.png"), decode="friendly")])[0]
    assert torch.equal(got, official) and not torch.equal(got, friendly)


def test_bad_model_path_is_one_line_error(tmp_path, capsys):
    """A missing checkpoint folder: exit 1 and one `error:` line naming it, no traceback."""
    from piip_llava.evaluation.cli import task_main

    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "image": "x.png", "text": "hi"}\n')
    code = task_main("textvqa")(["--model-path", str(tmp_path / "nope"), "--question-file", str(questions),
                                 "--image-folder", str(tmp_path), "--answers-file", str(tmp_path / "a.jsonl"),
                                 "--annotation-file", str(tmp_path / "ann.json")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error:") and "nope" in err and "Traceback" not in err
