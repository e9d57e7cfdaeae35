"""Fast checks of the training pieces: argument parsing (YAML + CLI), freeze policies, optimizer param groups,
stage-1 projector I/O."""
import json

import pytest
import torch

PRESET = "tiny-piip2_clip_64-128"


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": 0, "conversations": [{"from": "human", "value": "hi"},
                                                            {"from": "gpt", "value": "yo"}]}]))
    return str(path)


@pytest.fixture(scope="module")
def model():
    from piip_llava.models import PiipLlavaForConditionalGeneration, load_preset

    torch.manual_seed(0)
    return PiipLlavaForConditionalGeneration(load_preset(PRESET))


def test_yaml_then_cli_override_and_stage_defaults(tmp_path, data_file, tokenizer_dir):
    from piip_llava.train.arguments import parse_args

    run = tmp_path / "run.yaml"
    run.write_text(f"preset: {PRESET}\ntokenizer_path: {tokenizer_dir}\ndata_path: {data_file}\n"
                   f"output_dir: {tmp_path / 'out'}\nstage: 1\nlearning_rate: 0.001\nprojector_lr: 0.01\n"
                   "gradient_checkpointing: true\n")
    model_args, data_args, args = parse_args([str(run), "--learning_rate", "5e-4"])
    assert model_args.preset == PRESET and data_args.data_path == data_file
    assert args.learning_rate == 5e-4 and args.projector_lr == 0.01  # CLI wins, the rest from YAML
    assert args.stage == 1 and args.tune == "projector"
    assert args.llm_checkpointing and args.vision_gradient_checkpointing
    assert args.checkpointing_kwargs == {"use_reentrant": False}
    assert args.use_cpu and not args.remove_unused_columns
    _, _, args2 = parse_args([str(run), "--stage", "2", "--vision_gradient_checkpointing", "false"])
    assert args2.tune == "full" and not args2.vision_gradient_checkpointing


def test_bad_arguments_fail_early(tmp_path, data_file, tokenizer_dir):
    from piip_llava.train.arguments import parse_args

    base = ["--tokenizer_path", tokenizer_dir, "--data_path", data_file, "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="exactly one"):
        parse_args(base + ["--preset", PRESET, "--config", "x.json"])
    with pytest.raises(SystemExit):  # argparse rejects the choice
        parse_args(base + ["--preset", PRESET, "--tune", "everything"])
    with pytest.raises(ValueError, match="--qlora needs --tune lora"):
        parse_args(base + ["--preset", PRESET, "--qlora", "true"])
    with pytest.raises(ValueError, match="no such file"):
        parse_args(["--preset", PRESET, "--tokenizer_path", tokenizer_dir, "--data_path", str(tmp_path / "nope.json")])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("preset: x\nlearning_rat: 1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_args([str(bad_yaml)])


@pytest.mark.parametrize("tune,trainable", [
    ("projector", {"projector"}),
    ("projector+interactions", {"projector", "interactions"}),
    ("vision", {"projector", "interactions", "branches"}),
    ("full", {"projector", "interactions", "branches", "llm"}),
    ("projector+llm", {"projector", "llm"}),
    ("llm", {"llm"}),
])
def test_tune_policies(model, tune, trainable):
    from piip_llava.train.model_setup import apply_tune_policy

    counts = apply_tune_policy(model, tune)
    for group, params in model.param_groups().items():
        assert all(p.requires_grad == (group in trainable) for _, p in params)
        assert (counts[group] > 0) == (group in trainable)


def test_param_groups_lrs_and_weight_decay(model):
    from piip_llava.train.model_setup import apply_tune_policy
    from piip_llava.train.trainer import build_param_groups

    apply_tune_policy(model, "full")
    groups = build_param_groups(model, lr=1e-4, weight_decay=0.1,
                                module_lrs={"branches": 1e-5, "interactions": 1e-3, "projector": None})
    by_name = {g["name"]: g for g in groups}
    assert by_name["branches"]["lr"] == 1e-5 and by_name["interactions"]["lr"] == 1e-3
    assert by_name["projector"]["lr"] == 1e-4 and by_name["llm"]["lr"] == 1e-4
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    no_decay = model.no_weight_decay()
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            assert (g["weight_decay"] == 0.0) == (names[id(p)] in no_decay or p.ndim <= 1)
    gates = [names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]]
    assert not any(n.endswith(("ca_weight", "cffn_weight", "bias")) for n in gates)


def test_stage1_weights_round_trip(model, tmp_path):
    from piip_llava.models import PiipLlavaForConditionalGeneration
    from piip_llava.train.model_setup import load_pretrained_projector, save_stage1_weights

    with torch.no_grad():
        for p in model.vision_tower.interactions.parameters():
            p.add_(0.5)
    files = save_stage1_weights(model, str(tmp_path), "projector+interactions", should_save=True)
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == ["mm_interactions.safetensors", "mm_projector.safetensors"]
    torch.manual_seed(1)
    fresh = PiipLlavaForConditionalGeneration(model.config)
    loaded = load_pretrained_projector(fresh, str(tmp_path))
    src, dst = model.state_dict(), fresh.state_dict()
    assert loaded and all(torch.equal(src["model." + k], dst["model." + k]) for k in loaded)
    assert {k[len("model."):] for k in src
            if k.startswith(("model.multi_modal_projector.", "model.vision_tower.interactions."))} == set(loaded)
    with pytest.raises(ValueError, match="no mm_projector"):
        load_pretrained_projector(fresh, str(tmp_path / "missing"))
    # an interrupted copy of the stage-1 output: the cut file is named (CheckpointError, one line in the CLI)
    from piip_llava.models.loading import CheckpointError

    inter = tmp_path / "mm_interactions.safetensors"
    with open(inter, "r+b") as f:
        f.truncate(inter.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=r"mm_interactions\.safetensors: truncated"):
        load_pretrained_projector(fresh, str(tmp_path))
