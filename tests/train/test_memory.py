"""`python -m piip_llava.train.memory`: the byte arithmetic of each ZeRO stage, LoRA counts, the fits verdict."""

from piip_llava.models import PiipLlavaForConditionalGeneration, load_preset
from piip_llava.train.memory import CONTEXT_OVERHEAD, estimate, main

PRESET = "tiny-piip2_clip_64-128"

def _counts():
    model = PiipLlavaForConditionalGeneration(load_preset(PRESET))
    groups = model.param_groups()
    total = sum(p.numel() for params in groups.values() for _, p in params)
    llm_proj = sum(p.numel() for g in ("llm", "projector") for _, p in groups[g])
    return total, llm_proj

def test_zero_stages_partition_what_they_should():
    total, trainable = _counts()
    kw = dict(micro_batch=2, seq_len=128, dtype="bf16", tune="projector+llm")
    e0 = estimate(PRESET, gpus=4, zero=0, **kw)
    assert (e0.params, e0.trainable) == (total, trainable)
    assert e0.weights_bytes == 2 * total and e0.grads_bytes == 2 * trainable and e0.optimizer_bytes == 12 * trainable
    e1, e2, e3 = (estimate(PRESET, gpus=4, zero=z, **kw) for z in (1, 2, 3))
    assert e1.optimizer_bytes == 3 * trainable and e1.grads_bytes == e0.grads_bytes
    assert e2.grads_bytes == trainable / 2 and e2.weights_bytes == e0.weights_bytes
    assert e3.weights_bytes == total / 2
    assert e0.activations_bytes == e3.activations_bytes > 0
    assert e3.total_bytes == e3.weights_bytes + e3.grads_bytes + e3.optimizer_bytes + e3.activations_bytes + \
        CONTEXT_OVERHEAD
    fp32 = estimate(PRESET, gpus=1, zero=0, micro_batch=2, seq_len=128, dtype="fp32", tune="projector+llm")
    assert fp32.optimizer_bytes == 8 * trainable and fp32.weights_bytes == 4 * total  # no master copy in fp32

def test_activations_scale_and_checkpointing():
    a = estimate(PRESET, micro_batch=2, seq_len=256, checkpointing=True).activations_bytes
    assert estimate(PRESET, micro_batch=4, seq_len=256, checkpointing=True).activations_bytes == 2 * a
    assert estimate(PRESET, micro_batch=2, seq_len=256, checkpointing=False).activations_bytes > a
    assert estimate(PRESET, micro_batch=2, seq_len=256, attention="math").activations_bytes > a

def test_lora_counts_rank_matrices_on_llm_projections():
    model = PiipLlavaForConditionalGeneration(load_preset(PRESET))
    text = model.config.text_config
    h, f, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    kv = text.num_key_value_heads * h // text.num_attention_heads
    per_layer = (h + h) + (h + kv) * 2 + (h + h) + (h + f) * 2 + (f + h)  # q, k, v, o, gate, up, down
    base = estimate(PRESET, tune="projector+interactions")
    lora = estimate(PRESET, lora=True, lora_r=8)
    assert lora.params - base.params == 8 * per_layer * layers
    assert lora.trainable - base.trainable == 8 * per_layer * layers

def test_cli_fits_verdict(capsys):
    assert main(["--preset", PRESET, "--gpus", "1", "--micro-batch", "1", "--gpu-mem", "80"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["--preset", "piip-llava_clip-bl_512-448_7B", "--gpus", "1", "--zero", "0", "--gpu-mem", "24"]) == 1
    assert "NO" in capsys.readouterr().out
    assert main(["--preset", PRESET, "--micro-batch", "0"]) == 2
