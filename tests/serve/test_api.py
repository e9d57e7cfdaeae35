"""OpenAI-compatible API served by uvicorn in a thread, driven with the official `openai` client."""
import base64

import httpx
import openai
import pytest

from piip_llava.serve.inference import ChatRequest

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(engine, free_port, images):
    import os

    from piip_llava.serve.api import create_app
    from piip_llava.testing import serve_in_thread

    with serve_in_thread(create_app(engine, "tiny", image_dir=os.path.dirname(images["red"])), free_port) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def image_message(text: str, url: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}


def expected(engine, messages, image_path=None, **kw) -> str:
    image = engine.open_image(image_path) if image_path else None
    return engine.generate([ChatRequest(messages, image)], max_new_tokens=MAX_TOKENS, temperature=0.0, **kw)[0]


def stream_text(client, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model="tiny", stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_health_and_models(server, client):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["waiting"] == 0
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_plain_and_stream_equal_engine_with_data_url_image(client, engine, images):
    messages = [image_message("What is in the image?", data_url(images["red"]))]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    want = expected(engine, [{"role": "user", "content": "What is in the image?"}], images["red"])
    assert want and plain.choices[0].message.content == want
    assert plain.choices[0].message.role == "assistant"
    assert plain.object == "chat.completion" and plain.model == "tiny"
    req = ChatRequest([{"role": "user", "content": "What is in the image?"}], engine.open_image(images["red"]))
    assert plain.usage.prompt_tokens == len(engine.prompt_ids(req))  # includes the visual tokens
    assert plain.usage.prompt_tokens > engine.config.num_image_tokens
    assert 0 < plain.usage.completion_tokens <= MAX_TOKENS
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    text, chunks = stream_text(client, messages=messages, max_completion_tokens=MAX_TOKENS, temperature=0,
                               stream_options={"include_usage": True})
    assert text == want
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_raw_sse_ends_with_done(server, images):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


def test_multi_turn_local_path_system_and_stop(client, engine, images):
    first = [{"role": "user", "content": "Describe it."}]
    a1 = expected(engine, first, images["blue"])
    messages = [{"role": "system", "content": "Be brief."},
                image_message("Describe it.", images["blue"]),  # a local file path
                {"role": "assistant", "content": a1},
                {"role": "user", "content": "And the colour?"}]
    want_msgs = [{"role": "system", "content": "Be brief."}, *first, {"role": "assistant", "content": a1},
                 {"role": "user", "content": "And the colour?"}]
    want = expected(engine, want_msgs, images["blue"])
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert got.choices[0].message.content == want
    text, _ = stream_text(client, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert text == want
    # a stop string taken from the middle of the greedy answer cuts it there
    stop = want.strip()[len(want) // 2:len(want) // 2 + 2]
    assert stop.strip()
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                         stop=[stop]).choices[0].message.content
    assert cut == want[: want.index(stop)].strip()
    text, _ = stream_text(client, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stop=stop)
    assert text == cut


def test_literal_image_text_is_refused_clearly(client, engine, images):
    """`<image>` is the image placeholder of the checkpoint's tokenizer and chat template (as in transformers and
    vLLM): typed into the text it would be an image slot without an image, so the request gets a 400 naming it,
    with or without an attached image, and the server keeps serving."""
    import openai

    prompt = "what is <image> in <image>?"
    for messages in ([image_message(prompt, data_url(images["red"]))], [{"role": "user", "content": prompt}]):
        with pytest.raises(openai.BadRequestError, match="literal <image>"):
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    ok = client.chat.completions.create(model="tiny", messages=[image_message("what is it?", data_url(images["red"]))],
                                        max_tokens=MAX_TOKENS, temperature=0)
    assert ok.choices[0].message.content == expected(engine, [{"role": "user", "content": "what is it?"}], images["red"])


def _bad_requests(images, engine):
    not_image = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    long_text = "word " * (engine.max_context + 100)
    return [
        ([image_message("hi", not_image)], {}, "not a readable image", None),
        ([image_message("hi", data_url(images["huge"]))], {}, "over the limit", None),
        ([image_message("hi", images["not_image"])], {}, "not a readable image", None),
        ([image_message("hi", "https://example.com/cat.png")], {}, "remote image URLs", None),
        ([image_message("hi", "data:image/png;base64,@@@")], {}, "base64", None),
        ([{"role": "user", "content": "   "}], {}, "empty", None),
        ([{"role": "user", "content": long_text}], {}, "maximum context length", "context_length_exceeded"),
        ([{"role": "user", "content": "hi"}], {"max_tokens": engine.max_context}, "maximum context length",
         "context_length_exceeded"),
        ([{"role": "assistant", "content": "hi"}], {}, "last message must be a user message", None),
        ([image_message("a", data_url(images["red"])), {"role": "assistant", "content": "b"},
          image_message("c", data_url(images["blue"]))], {}, "at most one image", None),
        ([{"role": "user", "content": "hi"}], {"temperature": -1}, "temperature", None),
        ([{"role": "tool", "content": "hi"}], {}, "role", None),
        ([], {}, "messages", None),
    ]


def test_bad_input_gets_400_and_server_keeps_serving(client, engine, images):
    for messages, extra, needle, code in _bad_requests(images, engine):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="tiny", messages=messages, stream=stream,
                                               **{"max_tokens": 4, **extra})
            err = info.value
            assert err.status_code == 400
            assert err.body["type"] == "invalid_request_error", err.body
            assert needle in err.body["message"], (needle, err.body["message"])
            if code:
                assert err.body["code"] == code
    # and the next good request works and is correct
    got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=MAX_TOKENS, temperature=0)
    assert got.choices[0].message.content == expected(engine, [{"role": "user", "content": "hello"}])


def test_error_body_shape(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": ""}]}, timeout=60)
    assert r.status_code == 400
    assert set(r.json()) == {"error"} and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
