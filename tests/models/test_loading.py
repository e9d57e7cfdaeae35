"""Every loader of checkpoints turns a bad folder into one message naming the file and what to do (exit status 1, no
traceback unless PIIP_DEBUG=1): training, chat, API, demo, evaluation's engine, the converter and merge_lora."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from piip_llava.models.loading import CheckpointError, check_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_dir):
    from piip_llava.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ours")), tokenizer_dir=tokenizer_dir)


@pytest.fixture
def broken(ckpt, tmp_path):
    """Copy of the tiny checkpoint with one fault: broken(fault) -> path."""
    def make(fault):
        path = str(tmp_path / f"ckpt_{fault}")
        shutil.copytree(ckpt, path)
        weights = os.path.join(path, "model.safetensors")
        if fault == "no_config":
            os.remove(os.path.join(path, "config.json"))
        elif fault == "bad_config":
            with open(os.path.join(path, "config.json"), "r+") as f:
                f.truncate(120)
        elif fault == "no_weights":
            os.remove(weights)
        elif fault == "cut_weights":
            with open(weights, "r+b") as f:
                f.truncate(os.path.getsize(weights) // 2)
        elif fault == "official":
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump({"model_type": "llava_llama", "mm_vision_tower": "configs/x.py"}, f)
        elif fault == "stage1":
            os.rename(weights, os.path.join(path, "mm_projector.safetensors"))
        elif fault == "no_tokenizer":
            for name in ("tokenizer.json", "tokenizer.model"):
                if os.path.exists(os.path.join(path, name)):
                    os.remove(os.path.join(path, name))
        return path
    return make


FAULTS = {  # fault -> (what the message must name, what it must say to do)
    "no_config": ("config.json", "not a model checkpoint"),
    "bad_config": ("config.json: not valid JSON", "copy it again"),
    "no_weights": ("no weights (model.safetensors)", "copy the checkpoint again"),
    "cut_weights": ("model.safetensors: truncated", "copy the checkpoint again"),
    "official": ("official OpenGVLab checkpoint", "python -m piip_llava.models.convert_official"),
    "stage1": ("stage-1 output", "--pretrained_projector"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_is_one_message_naming_the_file(broken, fault):
    path = broken(fault)
    with pytest.raises(CheckpointError) as e:
        check_checkpoint(path, "piip_llava", "--model_name_or_path")
    named, todo = FAULTS[fault]
    assert named in str(e.value) and todo in str(e.value) and path in str(e.value)


def test_missing_folder_and_a_file(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match=r"--model .*nope: no such folder; give the folder that holds config\.json"):
        check_checkpoint(str(tmp_path / "nope"), role="--model")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is a file, not a folder"):
        check_checkpoint(os.path.join(ckpt, "model.safetensors"), role="--model")


def test_output_dir_of_an_unfinished_run_points_to_its_checkpoints(tmp_path):
    os.makedirs(tmp_path / "checkpoint-200")
    os.makedirs(tmp_path / "checkpoint-1000")
    with pytest.raises(CheckpointError, match=r"has not finished .*use .*checkpoint-1000 or let the training finish"):
        check_checkpoint(str(tmp_path))


def test_ours_given_to_the_converter_and_an_llm_given_as_model(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="already a checkpoint of this project .* needs no conversion"):
        check_checkpoint(ckpt, "official", "src")
    llm = tmp_path / "llm"
    os.makedirs(llm)
    (llm / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match=r"model_type 'llama' \(an LLM: for training pass it as --llm_path\)"):
        check_checkpoint(str(llm))


def test_good_checkpoints_pass(ckpt, tmp_path):
    assert check_checkpoint(ckpt) == "piip_llava"
    official = tmp_path / "official"
    os.makedirs(official)
    (official / "config.json").write_text('{"model_type": "llava_llama"}')
    from safetensors.torch import save_file
    import torch

    save_file({"a": torch.ones(2)}, str(official / "model-00001-of-00001.safetensors"))
    assert check_checkpoint(str(official), ("piip_llava", "official")) == "official"


def test_engine_load_names_the_fault(broken, tmp_path):
    from piip_llava.serve.inference import InferenceEngine

    with pytest.raises(CheckpointError, match="model .*nope: no such folder"):
        InferenceEngine.load(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        InferenceEngine.load(broken("cut_weights"), device="cpu")
    with pytest.raises(CheckpointError, match=r"no tokenizer \(tokenizer.json or tokenizer.model\)"):
        InferenceEngine.load(broken("no_tokenizer"), device="cpu")


def test_lora_adapter_and_its_base_are_checked(ckpt, tmp_path):
    from piip_llava.serve.inference import InferenceEngine
    from piip_llava.train.merge_lora import main as merge_main

    adapter = tmp_path / "adapter"
    os.makedirs(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        InferenceEngine.load(str(adapter), device="cpu")
    from safetensors.torch import save_file
    import torch

    save_file({"a": torch.ones(2)}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"the LoRA base \(of adapter .*adapter\) .*gone: no such folder"):
        InferenceEngine.load(str(adapter), device="cpu")
    # training refuses an adapter where a model is expected and says to merge it
    with pytest.raises(CheckpointError, match="is a LoRA adapter .* merge it first"):
        check_checkpoint(str(adapter), "piip_llava", "--model_name_or_path")
    assert merge_main(["--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 1


@pytest.mark.parametrize("entry", ["serve.cli", "serve.api", "serve.gradio_demo", "convert", "merge", "train"])
def test_entry_points_exit_1_with_one_line(entry, broken, tmp_path, tokenizer_dir, capsys):
    """In process: each entry point returns 1 and prints one `error:` line naming the file."""
    bad = broken("cut_weights")
    if entry.startswith("serve."):
        import importlib

        main = importlib.import_module(f"piip_llava.{entry}").main
        argv = ["--model", bad]
    elif entry == "convert":
        from piip_llava.models.convert_official import main

        argv = [bad, str(tmp_path / "out")]  # ours given to the converter
    elif entry == "merge":
        from piip_llava.train.merge_lora import main

        argv = ["--adapter", bad, "--out", str(tmp_path / "out")]  # a model given as the adapter
    else:
        from piip_llava.train.train import main

        data = tmp_path / "d.json"
        data.write_text("[]")
        argv = ["--stage", "2", "--model_name_or_path", bad, "--tokenizer_path", tokenizer_dir, "--data_path",
                str(data), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    expected = {"convert": "needs no conversion", "merge": "no adapter_config.json"}.get(entry, "model.safetensors: truncated")
    assert expected in err[0] and bad in err[0]


def test_a_real_process_prints_no_traceback_unless_debugging(tmp_path):
    cmd = [sys.executable, "-m", "piip_llava.serve.cli", "--model", str(tmp_path / "missing")]
    env = dict(os.environ)
    env.pop("PIIP_DEBUG", None)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: model {tmp_path / 'missing'}: no such folder; give the folder that holds config.json and the weights: "
        "a training OUTPUT_DIR after training finished, one of its checkpoint-N folders, or the output of "
        "convert_official / merge_lora. A checkpoint on the Hugging Face Hub must be downloaded first "
        "(hf download ORG/NAME --local-dir DIR)"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(env, PIIP_DEBUG="1"))
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "CheckpointError" in proc.stderr
