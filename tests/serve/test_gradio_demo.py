"""The Gradio demo launched in-process (headless) and driven through its named API with `gradio_client`."""
import os

import pytest
from gradio_client import Client, handle_file

from piip_llava.serve.inference import ChatRequest

MAX_NEW = 16


@pytest.fixture(scope="module")
def scheduler(engine):
    from piip_llava.serve.scheduler import BatchScheduler

    sched = BatchScheduler(engine, max_batch_size=2, max_queue=8)
    yield sched
    sched.close()


@pytest.fixture(scope="module")
def client(engine, free_port, scheduler):
    from piip_llava.serve.gradio_demo import build_demo

    demo = build_demo(engine, concurrency_limit=2, scheduler=scheduler)
    demo.launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    yield Client(f"http://127.0.0.1:{free_port}/", verbose=False)
    demo.close()


def chat(client, message, image, history, temperature=0.0, top_p=1.0, max_new=MAX_NEW):
    """Returns (final outputs, all streamed outputs)."""
    job = client.submit(message, handle_file(image) if image else None, history, temperature, top_p, max_new,
                        api_name="/chat")
    final = job.result(timeout=300)
    return final, job.outputs()


def text_of(message) -> str:
    from piip_llava.serve.gradio_demo import content_text

    return content_text(message["content"])


def expected(engine, messages, image_path=None) -> str:
    image = engine.open_image(image_path) if image_path else None
    return engine.generate([ChatRequest(messages, image)], max_new_tokens=MAX_NEW, temperature=0.0)[0]


def test_named_endpoints(client):
    assert {"/chat", "/regenerate", "/clear"} <= set(client.view_api(print_info=False, return_format="dict")
                                                        ["named_endpoints"])


def test_image_and_two_turns_stream_equals_generate(client, engine, images):
    (history, box, notice), outputs = chat(client, "What is in this picture?", images["red"], [])
    a1 = expected(engine, [{"role": "user", "content": "What is in this picture?"}], images["red"])
    assert a1 and [m["role"] for m in history] == ["user", "assistant"]
    assert text_of(history[0]) == "What is in this picture?" and text_of(history[1]) == a1
    assert box == "" and notice == ""
    partial = [text_of(o[0][-1]) for o in outputs if o[0]]
    assert len(set(partial)) > 2 and partial[-1] == a1  # streamed: several growing versions of the answer
    assert all(a1.startswith(p) for p in partial)

    (history, _, notice), _ = chat(client, "Tell me more.", images["red"], history)
    a2 = expected(engine, [{"role": "user", "content": "What is in this picture?"}, {"role": "assistant", "content": a1},
                           {"role": "user", "content": "Tell me more."}], images["red"])
    assert [text_of(m) for m in history] == ["What is in this picture?", a1, "Tell me more.", a2]
    assert notice == ""

    # regenerate (greedy) reproduces the last answer; sampling still answers
    history2, _, _ = client.predict(handle_file(images["red"]), history, 0.0, 1.0, MAX_NEW, api_name="/regenerate")
    assert [text_of(m) for m in history2] == [text_of(m) for m in history]
    history3, _, _ = client.predict(handle_file(images["red"]), history, 0.9, 0.9, MAX_NEW, api_name="/regenerate")
    assert len(history3) == 4 and text_of(history3[2]) == "Tell me more." and text_of(history3[3])
    assert client.predict(api_name="/clear") == ([], "", None, "")


def test_text_only_and_literal_image_text(client, engine, images):
    prompt = "is it a picture?"
    (history, _, _), _ = chat(client, prompt, None, [])
    assert text_of(history[1]) == expected(engine, [{"role": "user", "content": prompt}])
    # a typed <image> is the image placeholder: refused with a notice, the conversation left as it was
    (history, typed, notice), _ = chat(client, "is <image> a picture?", images["blue"], [])
    assert history == [] and typed == "is <image> a picture?" and "literal <image>" in notice


def test_truncation_notice(client, engine, images):
    long_turn = "many words " * 120
    messages = []
    for i in range(4):
        messages += [{"role": "user", "content": f"{i} {long_turn}"}, {"role": "assistant", "content": f"ok {i}"}]
    history = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    (out, _, notice), _ = chat(client, "short question", images["red"], history)
    assert "truncated" in notice and "context" in notice
    messages.append({"role": "user", "content": "short question"})
    fitted, truncated = engine.fit_messages(ChatRequest(messages, engine.open_image(images["red"])), MAX_NEW)
    assert truncated and len(fitted.messages) < len(messages)
    assert text_of(out[-1]) == engine.generate([fitted], MAX_NEW, 0.0)[0]
    assert len(out) == len(history) + 2  # the UI still shows the whole conversation


@pytest.mark.parametrize("message,image,needle", [
    ("hello", "not_image", "not a readable image"),
    ("hello", "huge", "over the limit"),
    ("   ", "red", "Type a message"),
    ("word " * 1500, "red", "too long"),
])
def test_bad_input_is_reported_and_app_keeps_serving(client, engine, images, message, image, needle):
    before = [{"role": "user", "content": [{"type": "text", "text": "earlier question"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "earlier answer"}]}]
    (history, box, notice), _ = chat(client, message, images[image], before)
    assert needle in notice and notice.startswith("⚠️")
    assert images[image] not in notice  # names the upload, not the server's cache path
    assert [text_of(m) for m in history] == ["earlier question", "earlier answer"]  # conversation untouched
    assert box == message  # the typed text stays, to be fixed
    (history, _, notice), _ = chat(client, "hello", images["red"], [])
    assert notice == "" and text_of(history[1]) == expected(engine, [{"role": "user", "content": "hello"}],
                                                             images["red"])


def test_regenerate_on_empty_conversation(client):
    history, _, notice = client.predict(None, [], 0.0, 1.0, MAX_NEW, api_name="/regenerate")
    assert history == [] and "Nothing to regenerate" in notice


def test_two_users_at_once(client, engine, images):
    """The queue admits several sessions at once (generation is serialised by the engine); both get their answers."""
    jobs = [client.submit(q, handle_file(images[img]), [], 0.0, 1.0, MAX_NEW, api_name="/chat")
            for q, img in [("first user", "red"), ("second user", "blue")]]
    results = [j.result(timeout=300)[0] for j in jobs]
    assert text_of(results[0][1]) == expected(engine, [{"role": "user", "content": "first user"}], images["red"])
    assert text_of(results[1][1]) == expected(engine, [{"role": "user", "content": "second user"}], images["blue"])


def test_examples_exist():
    from piip_llava.serve.gradio_demo import example_rows

    rows = example_rows()
    assert rows and all(os.path.isfile(path) and question.strip() for path, question in rows)


def test_cancel_stops_the_generation(client, scheduler, images):
    """What the Stop button does (cancelling the running event) ends the row in the batch, not only the display."""
    import time

    job = client.submit("Tell me a very long story.", handle_file(images["red"]), [], 0.0, 1.0, 400, api_name="/chat")
    deadline = time.time() + 120
    while not scheduler.busy:
        assert time.time() < deadline, "generation never started"
        time.sleep(0.02)
    job.cancel()
    while scheduler.busy:
        assert time.time() < deadline, "generation kept running after cancel"
        time.sleep(0.05)


def test_share_needs_auth(tiny_ckpt):
    from piip_llava.serve.gradio_demo import main

    with pytest.raises(SystemExit) as info:  # refused before the model is loaded
        main(["--model-path", tiny_ckpt, "--share"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["--model-path", tiny_ckpt, "--auth", "no-colon"])
