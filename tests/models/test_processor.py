"""`PiipLlavaProcessor`: chat templates, LLaVA tokenisation, vLLM's one-pass view, save/load, self-contained checkpoints."""
import os

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from piip_llava.data.conversation import build_prompt_text, chat_template_jinja, tokenize_prompt
from piip_llava.models import PiipLlavaForConditionalGeneration, PiipLlavaProcessor, load_preset
from piip_llava.models.processing_piip_llava import prompt_prefix
from piip_llava.models.remote_code import BUNDLE, bundle_source
from piip_llava.testing import build_tiny_checkpoint, run_without_package

TEMPLATES = ["vicuna_v1", "plain", "llama3", "qwen2", "mistral"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is it?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Which colour?"}],
    [{"role": "user", "content": "Line one\nline two, \"quoted\" {{ not jinja }} é"}],
]


@pytest.fixture()
def processor(tokenizer):
    import copy

    return PiipLlavaProcessor.from_config(load_preset("tiny-piip2_clip_64-128"), copy.deepcopy(tokenizer))


def _with_image_parts(messages):
    """The same conversation in OpenAI/HF content-part form, image on the first user turn."""
    out, done = [], False
    for m in messages:
        if m["role"] == "user" and not done:
            out.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": m["content"]}]})
            done = True
        else:
            out.append(dict(m))
    return out


@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_template_renders_the_training_prompt(processor, name):
    """`apply_chat_template` = BOS (+ the space a one-pass SentencePiece encoding needs) + the training prompt."""
    prefix = prompt_prefix(processor.tokenizer)
    assert prefix == "<s> "
    jinja = chat_template_jinja(name, prefix)
    for messages in CONVERSATIONS:
        for has_image in (False, True):
            expected = prefix + build_prompt_text(messages, name, has_image)
            hf = _with_image_parts(messages) if has_image else messages
            got = processor.apply_chat_template(hf, tokenize=False, add_generation_prompt=True, chat_template=jinja)
            assert got == expected, (name, has_image)
            if has_image:  # LLaVA-style string with an <image> tag: same prompt
                tagged = [dict(m) for m in messages]
                first = next(i for i, m in enumerate(tagged) if m["role"] == "user")
                tagged[first]["content"] = "<image>\n" + tagged[first]["content"]
                assert processor.apply_chat_template(tagged, tokenize=False, chat_template=jinja) == expected


@pytest.mark.parametrize("name", TEMPLATES)
def test_processor_ids_equal_training_tokenisation(processor, name):
    image = Image.new("RGB", (50, 30), (200, 10, 10))
    for messages in CONVERSATIONS:
        text = build_prompt_text(messages, name, True)
        out = processor(images=[image], text=text)
        ref = processor.encode_messages(messages, True, name)
        assert out["input_ids"][0] == ref
        # the chat template's own output (with its BOS prefix) gives the same ids, BOS once
        rendered = processor.apply_chat_template(_with_image_parts(messages), tokenize=False,
                                                 chat_template=chat_template_jinja(name, prompt_prefix(processor.tokenizer)))
        assert processor(images=[image], text=rendered)["input_ids"][0] == ref
        assert ref.count(processor.image_token_id) == processor.num_image_tokens == 64
        # the same ids as the structured path before expansion, expanded
        raw = tokenize_prompt(messages, processor.tokenizer, name, True, processor.image_token_id)
        assert processor.expand(raw)[0] == ref
        torch.testing.assert_close(out["pixel_values"], processor.image_processor.pixel_values([image]))


def test_one_pass_tokenisation_with_replacement_equals_llava(processor):
    """What vLLM does with a chat request: render the chat template, tokenise it in one pass without adding special
    tokens, then replace `<image>` by the ids of the replacement the processor reports."""
    tok = processor.tokenizer
    for messages in CONVERSATIONS:
        text = processor.apply_chat_template(_with_image_parts(messages), tokenize=False)
        out = processor(images=[Image.new("RGB", (8, 8))], text=text, return_text_replacement_offsets=True)
        (entry,) = out["text_replacement_offsets"][0]
        assert entry["type"] == "image" and text[slice(*entry["span"])] == "<image>"
        one_pass = tok(text, add_special_tokens=False)["input_ids"]
        assert one_pass.count(processor.image_token_id) == 1
        rep = tok(entry["replacement"], add_special_tokens=False)["input_ids"]
        i = one_pass.index(processor.image_token_id)
        assert one_pass[:i] + rep + one_pass[i + 1:] == processor.encode_messages(messages, True)
    assert processor._get_num_multimodal_tokens(image_sizes=[(10, 20), (300, 40)]).num_image_tokens == [64, 64]


def test_batch_padding_and_placeholder_check(processor):
    processor.tokenizer.padding_side = "left"
    texts = [build_prompt_text(CONVERSATIONS[0], "vicuna_v1", True), build_prompt_text(CONVERSATIONS[1], "vicuna_v1", True)]
    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (9, 9))]
    out = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert out["input_ids"].shape == out["attention_mask"].shape and out["pixel_values"].shape[0] == 2
    n0 = int(out["attention_mask"][0].sum())
    assert out["attention_mask"][0, -n0:].all() and not out["attention_mask"][0, :-n0].any()
    with pytest.raises(ValueError, match="placeholder"):
        processor(images=images[:1], text=texts)


def test_literal_image_tag_in_text_only_sample_is_refused(processor):
    from piip_llava.data.conversation import ConversationFormatError

    conv = [{"from": "human", "value": "what does <image> mean in HTML?"}, {"from": "gpt", "value": "nothing"}]
    with pytest.raises(ConversationFormatError, match="image"):
        processor.encode_conversation(conv, has_image=False)


def test_auto_processor_round_trip(tmp_path, tokenizer_dir):
    ck = build_tiny_checkpoint(str(tmp_path / "ck"), tokenizer_dir=tokenizer_dir)
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer_config.json", *BUNDLE):
        assert os.path.isfile(os.path.join(ck, name)), name
    proc = AutoProcessor.from_pretrained(ck)
    assert isinstance(proc, PiipLlavaProcessor)
    cfg = PiipLlavaForConditionalGeneration.config_class.from_pretrained(ck)
    assert proc.image_token_id == cfg.image_token_id and proc.num_image_tokens == cfg.num_image_tokens
    assert proc.image_processor.image_size == cfg.vision_config.image_size


def test_bundle_is_free_of_package_imports():
    import re

    for name in BUNDLE:
        imports = re.findall(r"^\s*(?:from|import)\s+(\S+)", bundle_source(name), flags=re.MULTILINE)
        assert not [i for i in imports if i.startswith(("piip_llava", ".."))], (name, imports)


_REMOTE = r'''
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
ck, out = sys.argv[1], sys.argv[2]
proc = AutoProcessor.from_pretrained(ck, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(ck, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
inputs = proc(images=[Image.new("RGB", (40, 60), (0, 200, 0))], text=text, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
torch.save({"logits": logits, "input_ids": inputs["input_ids"], "text": text, "gen": gen}, out)
'''


@pytest.mark.parametrize("preset", ["tiny-piip2_clip_64-128", "tiny-piip3_clip_64-96-128"])
def test_checkpoint_runs_with_transformers_alone(tmp_path, tokenizer_dir, preset):
    """In a process that cannot import piip_llava: AutoProcessor + AutoModelForImageTextToText with remote code
    give exactly this package's inputs, logits and greedy tokens."""
    from piip_llava.serve.inference import ChatRequest, InferenceEngine

    ck = build_tiny_checkpoint(str(tmp_path / "ck"), preset=preset, tokenizer_dir=tokenizer_dir, gate_scale=0.5)
    proc = run_without_package(_REMOTE, [ck, str(tmp_path / "out.pt")], str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    engine = InferenceEngine.load(ck, device="cpu", dtype="float32")
    request = ChatRequest([{"role": "user", "content": "What is it?"}], Image.new("RGB", (40, 60), (0, 200, 0)))
    assert remote["text"] == "<s> " + build_prompt_text(request.messages, "vicuna_v1", True)
    batch = engine.prepare([request])
    assert torch.equal(remote["input_ids"], batch["input_ids"])
    with torch.no_grad():
        ours = engine.model(**batch).logits
    torch.testing.assert_close(remote["logits"], ours, rtol=0, atol=0)
    with torch.no_grad():
        gen = engine.model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(remote["gen"], gen)
