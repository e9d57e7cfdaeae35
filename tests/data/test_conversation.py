"""Label masks of every template against hand-written token pieces (tiny SentencePiece tokenizer from conftest)."""
import json
import os
import shutil

import pytest
import sentencepiece as spm

from piip_llava.constants import IGNORE_INDEX
from piip_llava.data.conversation import (
    VICUNA_SYSTEM,
    ConversationFormatError,
    ConversationTemplate,
    MaskingError,
    build_prompt_text,
    get_template,
    tokenize_conversation,
    tokenize_prompt,
)
from piip_llava.data.tokenizer import load_tokenizer

IMG = "IMG"
MULTI = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Cat"},
         {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "3 dogs"}]


def expected(tok, segments):
    """segments: [(pieces | raw text for the independent sentencepiece library, supervised)] -> ids, labels."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tok.name_or_path, "tokenizer.model"))
    ids, labels = [], []
    for seg, sup in segments:
        pieces = sp.encode(seg, out_type=str) if isinstance(seg, str) else seg
        for p in pieces:
            i = len(tok) if p == IMG else tok.convert_tokens_to_ids(p)
            assert p == IMG or i != tok.unk_token_id or p == "<unk>", f"piece {p!r} not in vocab"
            ids.append(i)
            labels.append(i if sup else IGNORE_INDEX)
    return ids, labels


@pytest.fixture(scope="module")
def legacy_tokenizer(tokenizer_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_legacy")
    for f in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, f), d / f)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["legacy"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return load_tokenizer(str(d))


def test_vicuna_multiturn_text_only_legacy_false(tokenizer):
    assert tokenizer.legacy is False
    ids, labels = tokenize_conversation(MULTI, tokenizer, "vicuna_v1", has_image=False)
    exp = expected(tokenizer, [
        (["<s>"], False), (VICUNA_SYSTEM + " USER: Hi? ASSISTANT:", False), (["▁C", "at", "</s>"], True),
        # legacy=False: no word-boundary prefix right after </s> (spec §2.6)
        (["U", "SER", ":", "▁C", "ol", "or", "?", "▁ASSISTANT", ":"], False), (["▁", "3", "▁dog", "s", "</s>"], True),
    ])
    assert (ids, labels) == exp
    assert tokenizer.decode([x for x in labels if x != IGNORE_INDEX]) == "Cat</s> 3 dogs</s>"


def test_vicuna_multiturn_legacy_true(legacy_tokenizer):
    tok = legacy_tokenizer
    ids, labels = tokenize_conversation(MULTI, tok, "vicuna_v1", has_image=False)
    exp = expected(tok, [
        (["<s>"], False), (VICUNA_SYSTEM + " USER: Hi? ASSISTANT:", False), (["▁C", "at", "</s>"], True),
        (["▁USER", ":", "▁C", "ol", "or", "?", "▁ASSISTANT", ":"], False), (["▁", "3", "▁dog", "s", "</s>"], True),
    ])
    assert (ids, labels) == exp


def test_vicuna_image_moves_placeholder_to_front(tokenizer):
    conv = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "Cat"}]
    ids, labels = tokenize_conversation(conv, tokenizer, "vicuna_v1", has_image=True, image_token_id=9999)
    exp_ids, exp_labels = expected(tokenizer, [
        (["<s>"], False), (VICUNA_SYSTEM + " USER: ", False), ([IMG], False),
        # the chunk after the image is tokenised alone: fresh "▁" dummy prefix, newline byte (spec §2.7)
        (["▁", "<0x0A>", "W", "h", "at", "▁i", "s", "▁i", "t", "?", "▁ASSISTANT", ":"], False),
        (["▁C", "at", "</s>"], True),
    ])
    exp_ids = [9999 if x == len(tokenizer) else x for x in exp_ids]
    assert (ids, labels) == (exp_ids, exp_labels)
    assert ids.count(9999) == 1


def test_plain_template_drops_instruction(tokenizer):
    conv = [{"from": "human", "value": "Describe this.\n<image>"}, {"from": "gpt", "value": "A red car."}]
    ids, labels = tokenize_conversation(conv, tokenizer, "plain", has_image=True)
    assert (ids, labels) == expected(tokenizer, [
        (["<s>", IMG], False), (["▁A", "▁re", "d", "▁c", "ar", ".", "<0x0A>"], True)])


def test_mistral_image_multiturn(tokenizer):
    conv = [{"from": "human", "value": "<image>\nHi?"}] + MULTI[1:]
    ids, labels = tokenize_conversation(conv, tokenizer, "mistral", has_image=True)
    inst = ["[", "I", "N", "S", "T", "]"]
    close = ["▁", "[", "/", "I", "N", "S", "T", "]"]
    assert (ids, labels) == expected(tokenizer, [
        (["<s>", "▁"] + inst + ["▁", IMG, "▁", "<0x0A>", "H", "i", "?"] + close, False),
        (["▁C", "at", "</s>"], True),
        (inst + ["▁C", "ol", "or", "?"] + close, False),
        (["▁", "3", "▁dog", "s", "</s>"], True),
    ])


def test_qwen2_chatml_masks_trailing_newline(tokenizer):
    ids, labels = tokenize_conversation(MULTI[:2], tokenizer, "chatml", has_image=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    flags = [x != IGNORE_INDEX for x in labels]
    # ...<|im_start|>assistant\n | Cat<|im_end|> (supervised) | \n (masked)
    assert pieces[-13:] == ["t", "<0x0A>", "C", "at", "<", "|", "i", "m", "_", "en", "d", "|", ">", "<0x0A>"][1:]
    assert flags[-13:] == [False] + [True] * 11 + [False]
    assert not any(flags[:-13])
    assert tokenizer.decode(ids[1:-12], skip_special_tokens=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert get_template("chatml") is get_template("qwen2")


def test_llama3_supervises_answer_and_eot(tokenizer):
    ids, labels = tokenize_conversation(MULTI[:2], tokenizer, "llama3", has_image=False)
    sup = [tokenizer.convert_ids_to_tokens(x) for x in labels if x != IGNORE_INDEX]
    assert sup == ["C", "at", "<", "|", "e", "o", "t", "_", "id", "|", ">"]
    assert labels[-len(sup):] == ids[-len(sup):]
    assert all(x == IGNORE_INDEX for x in labels[:-len(sup)])


def test_masking_error_on_straddling_token(tokenizer):
    # "... t" + "he</s>": the merged piece "▁the" holds prompt and answer characters: no consistent mask exists
    tpl = ConversationTemplate(name="bad", system="", system_format="", user_format="Q {content}",
                               assistant_prefix=" t", answer_format="{content}</s>", stop_str="</s>")
    with pytest.raises(MaskingError, match="spans prompt and answer"):
        tokenize_conversation([{"from": "human", "value": "x"}, {"from": "gpt", "value": "he"}], tokenizer, tpl, False)


def test_conversation_format_errors(tokenizer):
    with pytest.raises(ConversationFormatError) as e:
        tokenize_conversation([{"from": "human", "value": "only a question"}], tokenizer, "vicuna_v1", False)
    assert e.value.reason == "no_assistant_turn"
    with pytest.raises(ConversationFormatError) as e:
        tokenize_conversation([{"from": "human", "value": "<image> a <image>"}, {"from": "gpt", "value": "b"}],
                              tokenizer, "vicuna_v1", True)
    assert e.value.reason == "image_tags"
    with pytest.raises(ConversationFormatError) as e:
        tokenize_conversation([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], tokenizer,
                              "vicuna_v1", False)
    assert e.value.reason == "schema"


def test_get_template_unknown_lists_names():
    with pytest.raises(ValueError, match="vicuna_v1") as e:
        get_template("vicuna_v9")
    assert "qwen2" in str(e.value) and "plain" in str(e.value)
    assert get_template("vicuna_v1").stop_str == "</s>"
    assert get_template("llama3").stop_str == "<|eot_id|>"
    assert get_template("qwen2").stop_str == "<|im_end|>"


def test_generation_prompt_text_and_ids_match_training_prefix(tokenizer):
    msgs = [{"role": "user", "content": "What is it?"}]
    assert build_prompt_text(msgs, "vicuna_v1", has_image=True) == f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    ids = tokenize_prompt(msgs, tokenizer, "vicuna_v1", has_image=True, image_token_id=7777)
    train_ids, train_labels = tokenize_conversation(
        [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Cat"}], tokenizer,
        "vicuna_v1", True, 7777)
    first_sup = next(i for i, x in enumerate(train_labels) if x != IGNORE_INDEX)
    assert ids == train_ids[:first_sup]
    assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["▁ASSISTANT", ":"]


def test_literal_image_text_in_chat_stays_text(tokenizer):
    msgs = [{"role": "user", "content": "what is <image> here"}]
    ids = tokenize_prompt(msgs, tokenizer, "vicuna_v1", has_image=True, image_token_id=7777)
    assert ids.count(7777) == 1
    first = ids.index(7777)
    assert tokenizer.convert_ids_to_tokens(ids[first + 1:first + 4]) == ["▁", "<0x0A>", "w"]
    pieces = tokenizer.convert_ids_to_tokens(ids[first + 1:])
    assert pieces[pieces.index("▁<"):pieces.index("▁<") + 3] == ["▁<", "image", ">"]
    assert tokenize_prompt(msgs, tokenizer, "vicuna_v1", has_image=False, image_token_id=7777).count(7777) == 0
    # history with an assistant turn: the previous answer is closed by </s>, prompt ends with the assistant prefix
    hist = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Cat"},
            {"role": "user", "content": "Color?"}]
    assert build_prompt_text(hist, "vicuna_v1", False) == f"{VICUNA_SYSTEM} USER: Hi? ASSISTANT: Cat</s>USER: Color? ASSISTANT:"


def test_text_only_record_with_literal_image_in_answer(tokenizer):
    conv = [{"from": "human", "value": "Which tag?"}, {"from": "gpt", "value": "<image>"}]
    ids, labels = tokenize_conversation(conv, tokenizer, "vicuna_v1", has_image=False)
    assert len(tokenizer) not in ids
    assert tokenizer.decode([x for x in labels if x != IGNORE_INDEX]) == "<image></s>"
