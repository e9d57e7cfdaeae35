"""scripts/experiments/lm_lookup_probe.py (the figures of docs/quickstart.md, "Language pretraining"): it trains the
preset's LLM on lm_pretrain records and reports first-answer accuracy per question kind."""
import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _probe():
    spec = importlib.util.spec_from_file_location("lm_lookup_probe", REPO / "scripts/experiments/lm_lookup_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kinds_and_report(tokenizer_dir, capsys):
    probe = _probe()
    from piip_llava.data import synthetic

    assert probe.kind_of(f"What word is written in red?\n{synthetic.SHORT_ANSWER_PROMPT}") == "colour_word"
    assert probe.kind_of(f"The answer is jet.\nWhich?\nA. jet\nB. cat\n{synthetic.MC_ANSWER_PROMPT}") == "mc_stated"
    assert probe.kind_of(f"Which?\nA. jet\nB. cat\n{synthetic.MC_ANSWER_PROMPT}") == "mc_scene"
    assert probe.kind_of("What shape is shown?") == "other"
    assert probe.main(["--tokenizer", tokenizer_dir, "--steps", "2", "--eval-every", "1", "--batch", "2",
                       "--layers", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["1", "2"]
    for line in lines:
        scores = dict(re.findall(r"(colour_word|mc_scene|mc_stated|other) ([0-9.]+)", line))
        assert set(scores) == {"colour_word", "mc_scene", "mc_stated", "other"}
        assert all(0.0 <= float(v) <= 1.0 for v in scores.values())
