"""The lmms-eval adapter end to end, offline: a local lmms-eval task over synthetic images (JSONL read by the
`datasets` json builder), run through `python -m piip_llava.evaluation.lmms_eval` with a tiny checkpoint; the answers
lmms-eval logs equal our in-process greedy answers, and the task's metric is in its results JSON."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

if os.environ.get("PIIP_REQUIRE_LMMS") != "1":
    pytest.importorskip("lmms_eval", reason='lmms-eval not installed (pip install -e ".[lmms]"; '
                                            "PIIP_REQUIRE_LMMS=1 makes this a failure)")

TASK = "piip_synthetic_vqa"
STOP = "\n"
MAX_NEW_TOKENS = 8
QUESTION_TYPES = ("large_word", "color", "shape", "count", "small_word", "large_word")

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
  until: [{stop}]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = '''\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}
'''


def _write_task(root):
    """Images + questions.jsonl + the task folder (YAML and utils.py) under `root`; returns (task_dir, docs)."""
    from piip_llava.data.synthetic import render_question_image

    images, task_dir = root / "images", root / "tasks" / TASK
    images.mkdir(parents=True)
    task_dir.mkdir(parents=True)
    docs = []
    for i, kind in enumerate(QUESTION_TYPES):
        image, question, answer = render_question_image(seed=i, image_size=128, question_type=kind)
        path = images / f"{i}.png"
        image.save(path)
        docs.append({"question_id": i, "image": str(path), "question": question, "answer": answer})
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task_dir / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=json.dumps(str(data)),
                                                            max_new_tokens=MAX_NEW_TOKENS, stop=json.dumps(STOP)))
    (task_dir / "utils.py").write_text(TASK_UTILS)
    return task_dir, docs


def _in_process_answers(ckpt, docs):
    from piip_llava.models import load_image
    from piip_llava.serve.inference import ChatRequest, InferenceEngine

    engine = InferenceEngine.load(ckpt, device="cpu", dtype="float32")
    return [engine.generate([ChatRequest([{"role": "user", "content": d["question"]}],
                                         load_image(d["image"], decode="official"))],
                            max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, stop=[STOP])[0] for d in docs]


def test_lmms_eval_adapter_answers_equal_in_process_greedy(tmp_path, tokenizer_dir):
    from piip_llava.testing import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(str(tmp_path / "ckpt"), tokenizer_dir=tokenizer_dir, gate_scale=0.5)
    task_dir, docs = _write_task(tmp_path)
    out = tmp_path / "lmms_out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="disabled", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "piip_llava.evaluation.lmms_eval", "--model", "piip_llava",
           "--model_args", f"pretrained={ckpt},dtype=fp32,device=cpu", "--tasks", TASK,
           "--include_path", str(task_dir), "--batch_size", "4", "--log_samples", "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log

    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob(f"*_samples_{TASK}.jsonl"))
    assert len(results) == 1 and len(samples) == 1, f"outputs {sorted(out.rglob('*'))}\n{log}"
    metrics = json.loads(results[0].read_text())["results"][TASK]
    assert "exact_match,none" in metrics and 0.0 <= metrics["exact_match,none"] <= 1.0

    logged = [json.loads(line) for line in samples[0].read_text().splitlines() if line.strip()]
    # doc_id is the row of questions.jsonl; filtered_resps is the answer (a one-element list in some versions)
    by_row = {r["doc_id"]: r["filtered_resps"] if isinstance(r["filtered_resps"], str) else r["filtered_resps"][0]
              for r in logged}
    ours = _in_process_answers(ckpt, docs)
    assert [by_row[i] for i in range(len(docs))] == ours
    assert any(ours), "all answers empty: the comparison would prove nothing"
    expected = sum(a.strip().lower() == d["answer"].lower() for a, d in zip(ours, docs, strict=True)) / len(docs)
    assert metrics["exact_match,none"] == pytest.approx(expected)
