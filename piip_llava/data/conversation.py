"""Conversation templates, prompt building and label masking for LLaVA-format data.

Templates: `plain` (stage-1 captioning), `vicuna_v1` (LLaVA-1.5 stage 2 and every LLaVA-1.5 benchmark), `llama3`,
`qwen2` (alias `chatml`) and `mistral`.

Token ids are exactly LLaVA's `tokenizer_image_token`: the prompt is cut at each image slot, every chunk is tokenised
on its own (so the text after the image gets a fresh `▁` dummy prefix), one BOS is kept at the front, and each image
slot becomes ONE `image_token_id` (expanded later by `expand_image_tokens`).

Labels are computed differently from LLaVA's `preprocess_v1`, on purpose. LLaVA re-tokenises each round alone and
subtracts fudge terms (`-2` for BOS and the lone `▁` after "ASSISTANT: ", `-1` per round when `legacy=False`,
spec eval_data_formats §2.5/§2.6); a wrong guess silently zeroes the sample. Here the whole chunk is tokenised once
with character offsets and a token is supervised iff its characters lie in an answer span (the answer with its
leading separator space and its end token, e.g. `" Cat</s>"`). That is correct for `legacy=True` and `legacy=False`
tokenizers alike (the off-by-one never arises because nothing is counted separately), and it is checked: a token that
straddles prompt and answer characters, or an answer that covers no token, raises `MaskingError` (the dataset skips
and counts the sample; we never train on wrong labels). The result equals LLaVA's masks for Vicuna: supervised tokens
are each answer plus its `</s>`; system prompt, `USER:`, questions, image token and `ASSISTANT:` are masked.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from piip_llava.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_NEXT_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)


class MaskingError(ValueError):
    """Labels cannot be aligned with the tokenisation (a token straddles prompt and answer, or an answer vanished)."""


class ConversationFormatError(ValueError):
    """The conversation itself is malformed; `reason` is a short key (`schema`, `no_assistant_turn`, `image_tags`)."""

    def __init__(self, message: str, reason: str = "schema"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ConversationTemplate:
    """How one chat turn is written. `{content}` is replaced by the message; answers are supervised with `answer_format`.

    A rendered conversation is `system_format` + per round (`user_format` + `assistant_prefix` + `answer_format` +
    `answer_suffix`); a generation prompt stops after the last `assistant_prefix`. The image slot goes at the front of
    the first user message, followed by `image_sep`.
    """

    name: str
    system: str
    system_format: str
    user_format: str
    assistant_prefix: str
    answer_format: str
    stop_str: str
    answer_suffix: str = ""
    image_sep: str = "\n"
    drop_user_text: bool = False  # plain: the human instruction is discarded, only the image remains

    def __post_init__(self):
        for field in ("user_format", "answer_format"):
            if getattr(self, field).count("{content}") != 1:
                raise ValueError(f"template {self.name!r}: {field} must contain '{{content}}' exactly once")
        if self.system and self.system_format.count("{system}") != 1:
            raise ValueError(f"template {self.name!r}: system_format must contain '{{system}}' exactly once")


_TEMPLATES: dict[str, ConversationTemplate] = {
    "plain": ConversationTemplate(
        name="plain", system="", system_format="", user_format="{content}", assistant_prefix="",
        answer_format="{content}\n", stop_str="\n", image_sep="", drop_user_text=True,
    ),
    "vicuna_v1": ConversationTemplate(
        name="vicuna_v1", system=VICUNA_SYSTEM, system_format="{system} ", user_format="USER: {content} ",
        assistant_prefix="ASSISTANT:", answer_format=" {content}</s>", stop_str="</s>",
    ),
    "llama3": ConversationTemplate(
        name="llama3", system=LLAVA_NEXT_SYSTEM,
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n", answer_format="{content}<|eot_id|>",
        stop_str="<|eot_id|>",
    ),
    "qwen2": ConversationTemplate(
        name="qwen2", system="You are a helpful assistant.", system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n", assistant_prefix="<|im_start|>assistant\n",
        answer_format="{content}<|im_end|>", answer_suffix="\n", stop_str="<|im_end|>",
    ),
    # Mistral-Instruct's own format ("[INST] q [/INST] a</s>"); LLaVA's `mistral_instruct` adds a space before </s>.
    "mistral": ConversationTemplate(
        name="mistral", system="", system_format="", user_format="[INST] {content} [/INST]", assistant_prefix="",
        answer_format=" {content}</s>", stop_str="</s>",
    ),
}
_ALIASES = {"chatml": "qwen2", "v1": "vicuna_v1"}

TemplateName = Literal["plain", "vicuna_v1", "v1", "llama3", "qwen2", "chatml", "mistral"]


def template_names() -> list[str]:
    return sorted(list(_TEMPLATES) + list(_ALIASES))


def get_template(name: str | ConversationTemplate) -> ConversationTemplate:
    """Template by name (`plain`, `vicuna_v1`/`v1`, `llama3`, `qwen2`/`chatml`, `mistral`)."""
    if isinstance(name, ConversationTemplate):
        return name
    key = _ALIASES.get(name, name)
    if key not in _TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(template_names())}")
    return _TEMPLATES[key]


# --------------------------------------------------------------------------------------------------- rendering
_IMAGE = object()  # sentinel for the image slot inside a list of pieces
Piece = tuple  # ("text", str, supervised: bool) or (_IMAGE,)


def _split(fmt: str, key: str) -> tuple[str, str]:
    head, _, tail = fmt.partition("{" + key + "}")
    return head, tail


def _render(template: ConversationTemplate, rounds: Sequence[tuple[str, str | None]], has_image: bool,
            system: str | None = None) -> list[Piece]:
    """Pieces of a conversation; the last round's answer may be None (generation prompt)."""
    pieces: list[Piece] = []
    system = template.system if system is None else system
    if system and template.system_format:
        pieces.append(("text", template.system_format.replace("{system}", system), False))
    u_head, u_tail = _split(template.user_format, "content")
    a_head, a_tail = _split(template.answer_format, "content")
    for i, (user, answer) in enumerate(rounds):
        pieces.append(("text", u_head, False))
        if i == 0 and has_image:
            pieces.append((_IMAGE,))
            if template.image_sep:
                pieces.append(("text", template.image_sep, False))
        if not template.drop_user_text:
            pieces.append(("text", user, False))
        pieces.append(("text", u_tail + template.assistant_prefix, False))
        if answer is not None:
            pieces.append(("text", a_head + answer + a_tail, True))
            if template.answer_suffix:
                pieces.append(("text", template.answer_suffix, False))
    return [p for p in pieces if p[0] is _IMAGE or p[1]]


def _pieces_to_text(pieces: list[Piece]) -> str:
    return "".join(IMAGE_PLACEHOLDER if p[0] is _IMAGE else p[1] for p in pieces)


def bos_ids(tokenizer) -> list[int]:
    """[BOS] when the tokenizer adds one on encode (Llama, Llama-3), else [] (Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _check_no_image_token(ids: list[int], image_token_id: int) -> None:
    """A literal `<image>` in the text becomes the image token with a tokenizer that knows it (the processor's): an
    image slot with no image. Refused here, so the sample is skipped and counted instead of breaking a batch."""
    if image_token_id in ids:
        raise ConversationFormatError(f"the text holds a literal {IMAGE_PLACEHOLDER} where no image goes",
                                      reason="image_tags")


def _encode(pieces: list[Piece], tokenizer, image_token_id: int, with_labels: bool) -> tuple[list[int], list[int]]:
    """Tokenise pieces as LLaVA's `tokenizer_image_token` does, and label tokens by character offsets."""
    ids: list[int] = list(bos_ids(tokenizer))
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    chunks: list[list[Piece]] = [[]]
    for p in pieces:
        if p[0] is _IMAGE:
            chunks.append([])
        else:
            chunks[-1].append(p)
    num_answers = sum(1 for p in pieces if p[0] != _IMAGE and p[2])
    answers_seen = 0
    for c, chunk in enumerate(chunks):
        if c > 0:
            ids.append(image_token_id)
            labels.append(IGNORE_INDEX)
        text = "".join(p[1] for p in chunk)
        if not text:
            continue
        if not with_labels:
            chunk_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            _check_no_image_token(chunk_ids, image_token_id)
            ids.extend(chunk_ids)
            continue
        sup = bytearray(len(text))  # 1 where the character belongs to an answer span
        spans = []
        pos = 0
        for p in chunk:
            if p[2]:
                sup[pos:pos + len(p[1])] = b"\x01" * len(p[1])
                spans.append((pos, pos + len(p[1])))
            pos += len(p[1])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        flags = [False] * len(offsets)
        for t in range(len(offsets) - 1, -1, -1):
            s, e = offsets[t]
            if e <= s:  # zero-width token: takes the status of the token after it
                flags[t] = flags[t + 1] if t + 1 < len(offsets) else False
                continue
            n = sum(sup[s:e])
            if 0 < n < e - s:
                raise MaskingError(
                    f"token {tokenizer.convert_ids_to_tokens(enc['input_ids'][t])!r} spans prompt and answer text "
                    f"{text[s:e]!r}; cannot mask this sample consistently")
            flags[t] = n > 0
        for s, e in spans:
            if not any(flags[t] and offsets[t][0] < e and offsets[t][1] > s for t in range(len(offsets))):
                raise MaskingError(f"answer span {text[s:e]!r} covers no token after tokenisation")
            answers_seen += 1
        tok_ids = enc["input_ids"]
        _check_no_image_token(tok_ids, image_token_id)
        ids.extend(tok_ids)
        labels.extend(i if f else IGNORE_INDEX for i, f in zip(tok_ids, flags))
    if with_labels and answers_seen != num_answers:
        raise MaskingError(f"{num_answers - answers_seen} answer span(s) lost during tokenisation")
    return ids, labels


# --------------------------------------------------------------------------------------------------- training side
def _rounds_from_llava(conversations: Sequence[dict], has_image: bool) -> list[tuple[str, str]]:
    """LLaVA turns -> [(user, answer)], image tags removed from human turns (the template re-inserts one slot)."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ConversationFormatError("`conversations` must be a non-empty list")
    turns = list(conversations)
    for t in turns:
        if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
            raise ConversationFormatError(f"bad turn {str(t)[:80]!r}: need {{'from': 'human'|'gpt', 'value': str}}")
    while turns and turns[0]["from"] != "human":  # LLaVA drops leading non-human turns
        turns = turns[1:]
    if len(turns) % 2 == 1:  # a trailing question without answer teaches nothing
        turns = turns[:-1]
    if not turns:
        raise ConversationFormatError("no assistant turn", reason="no_assistant_turn")
    rounds = []
    num_tags = 0
    for i in range(0, len(turns), 2):
        h, g = turns[i], turns[i + 1]
        if h["from"] != "human" or g["from"] != "gpt":
            raise ConversationFormatError(f"turns {i} and {i + 1} are not a human/gpt pair")
        user = h["value"]
        if has_image:
            num_tags += user.count(IMAGE_PLACEHOLDER)
            if IMAGE_PLACEHOLDER in user:
                user = user.replace(IMAGE_PLACEHOLDER, "").strip()
        rounds.append((user, g["value"]))
    if num_tags > 1:
        raise ConversationFormatError(f"{num_tags} {IMAGE_PLACEHOLDER} tags for one image", reason="image_tags")
    return rounds


def tokenize_conversation(conversations: Sequence[dict], tokenizer, template: str | ConversationTemplate,
                          has_image: bool, image_token_id: int | None = None) -> tuple[list[int], list[int]]:
    """LLaVA turns -> (input_ids, labels) with ONE image token; labels IGNORE_INDEX except answers and end tokens.

    Raises `ConversationFormatError` for malformed conversations and `MaskingError` when labels cannot be aligned.
    For text-only samples (`has_image=False`) a literal `<image>` in the text stays text.
    """
    tpl = get_template(template)
    image_token_id = len(tokenizer) if image_token_id is None else image_token_id
    rounds = _rounds_from_llava(conversations, has_image)
    return _encode(_render(tpl, rounds, has_image), tokenizer, image_token_id, with_labels=True)


# --------------------------------------------------------------------------------------------------- generation side
def _rounds_from_messages(messages: Sequence[dict]) -> tuple[list[tuple[str, str | None]], str | None]:
    msgs = list(messages)
    system = None
    if msgs and msgs[0].get("role") == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    if not msgs or msgs[-1].get("role") != "user":
        raise ConversationFormatError("messages must end with a user message")
    rounds: list[tuple[str, str | None]] = []
    for i in range(0, len(msgs), 2):
        u = msgs[i]
        a = msgs[i + 1] if i + 1 < len(msgs) else None
        if u.get("role") != "user" or (a is not None and a.get("role") != "assistant"):
            raise ConversationFormatError(f"messages {i}/{i + 1} are not a user/assistant pair")
        rounds.append((str(u["content"]), None if a is None else str(a["content"])))
    return rounds, system


def build_prompt_text(messages: Sequence[dict], template: str | ConversationTemplate, has_image: bool) -> str:
    """The generation prompt as a string (image slot shown as `<image>`), e.g. for logs and answer files.

    `messages`: [{"role": "system"?|"user"|"assistant", "content": str}], ending with a user message.
    """
    rounds, system = _rounds_from_messages(messages)
    return _pieces_to_text(_render(get_template(template), rounds, has_image, system))


def tokenize_prompt(messages: Sequence[dict], tokenizer, template: str | ConversationTemplate, has_image: bool,
                    image_token_id: int | None = None) -> list[int]:
    """Generation prompt ids, ending with the assistant prefix; ONE image token at the front of the first user turn.

    Any literal `<image>` typed by the user is tokenised as text, never as a second image slot.
    """
    rounds, system = _rounds_from_messages(messages)
    image_token_id = len(tokenizer) if image_token_id is None else image_token_id
    pieces = _render(get_template(template), rounds, has_image, system)
    ids, _ = _encode(pieces, tokenizer, image_token_id, with_labels=False)
    return ids


# --------------------------------------------------------------------------------------------------- Jinja
def chat_template_jinja(template: str | ConversationTemplate, prefix: str = "") -> str:
    """The template as a Jinja chat template: `apply_chat_template(messages)` renders `prefix + build_prompt_text`.

    Messages may hold a string (a LLaVA-style `<image>` tag in it marks the image and is removed, as in training
    data) or a list of parts (`{"type": "image"}` / `{"type": "image_url"}` and `{"type": "text", "text": ...}`).
    As in training, the image slot goes at the front of the first user message, whatever its position there.
    `prefix` is written first: the processor passes the tokenizer's BOS (and, for SentencePiece tokenizers, the
    space that makes a one-pass tokenisation put `▁` on the first word as LLaVA's encoding does), because vLLM
    encodes chat prompts without adding special tokens.
    """
    import json

    tpl = get_template(template)

    def lit(text: str) -> str:
        return json.dumps(text)  # a valid Jinja string literal (escapes as in Python)

    s_head, s_tail = _split(tpl.system_format, "system") if tpl.system_format else ("", "")
    u_head, u_tail = _split(tpl.user_format, "content")
    a_head, a_tail = _split(tpl.answer_format, "content")
    return (
        "{#- piip_llava conversation template " + tpl.name + " (generated from ConversationTemplate) -#}\n"
        + ("{{ " + lit(prefix) + " }}" if prefix else "")
        + "{%- set image_token = " + lit(IMAGE_PLACEHOLDER) + " -%}\n"
        "{%- macro text_of(content) -%}"
        "{%- if content is string -%}"
        "{%- if image_token in content -%}{{ content | replace(image_token, '') | trim }}{%- else -%}{{ content }}{%- endif -%}"
        "{%- else -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}\n"
        "{%- set ns = namespace(system=" + lit(tpl.system) + ", has_image=false, first_user=true) -%}\n"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- if image_token in m['content'] -%}{%- set ns.has_image = true -%}{%- endif -%}"
        "{%- else -%}{%- for part in m['content'] -%}"
        "{%- if part['type'] in ['image', 'image_url', 'input_image'] -%}{%- set ns.has_image = true -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endfor -%}\n"
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = text_of(messages[0]['content']) -%}"
        "{%- endif -%}\n"
        + ("{%- if ns.system -%}{{ " + lit(s_head) + " }}{{ ns.system }}{{ " + lit(s_tail) + " }}{%- endif -%}\n"
           if tpl.system_format else "")
        + "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}"
        "{{ " + lit(u_head) + " }}"
        "{%- if ns.first_user and ns.has_image -%}{{ image_token }}{{ " + lit(tpl.image_sep) + " }}{%- endif -%}"
        + ("" if tpl.drop_user_text else "{{ text_of(m['content']) }}")
        + "{{ " + lit(u_tail + tpl.assistant_prefix) + " }}"
        "{%- set ns.first_user = false -%}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{ " + lit(a_head) + " }}{{ text_of(m['content']) }}{{ " + lit(a_tail + tpl.answer_suffix) + " }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
