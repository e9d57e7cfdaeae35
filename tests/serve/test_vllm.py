"""vLLM serves our checkpoints (`bash scripts/serve_vllm.sh`): same greedy tokens as `generate()`, images matter,
streaming, bad images refused. Needs the vLLM environment (`bash scripts/serve_vllm.sh --setup`, ~3 min, 3.5 GB):
skipped without it unless PIIP_REQUIRE_VLLM=1 (CI sets it, so there a missing environment fails)."""
import base64
import io
import json
import os
import subprocess

import httpx
import pytest
import torch
from PIL import Image

from piip_llava.serve.inference import ChatRequest, InferenceEngine
from piip_llava.testing import stop_process_group, wait_until_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.environ.get("VLLM_VENV", os.path.join(ROOT, ".venv-vllm"))
MAX_TOKENS = 12

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
if not os.path.isfile(os.path.join(VENV, "bin", "python")) and os.environ.get("PIIP_REQUIRE_VLLM") != "1":
    pytestmark.append(pytest.mark.skip(reason=f"no vLLM environment at {VENV} (bash scripts/serve_vllm.sh --setup)"))


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGES = {
    "red": Image.new("RGB", (64, 48), (220, 30, 30)),
    "stripes": Image.fromarray((torch.arange(96 * 96 * 3).reshape(96, 96, 3) * 37 % 256).to(torch.uint8).numpy()),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    """The mini preset: its LLM's head size (32) is one vLLM's CPU attention supports (16 is not)."""
    from piip_llava.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("vllm_ckpt")), preset="mini-piip2_clip-ls_64-128",
                                 tokenizer_dir=tokenizer_dir, gate_scale=0.5)


@pytest.fixture(scope="module")
def vllm_server(checkpoint, free_port, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("vllm_log") / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path_factory.mktemp("hf_modules")))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "serve_vllm.sh"), checkpoint,
                                 "--port", str(free_port), "--host", "127.0.0.1", "--served-model-name", "piip"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{free_port}"
    try:
        wait_until_healthy(proc, base, 600, str(log_path), poll_s=2)
        yield base
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return InferenceEngine.load(checkpoint, device="cpu", dtype="float32")


def ours(engine, image: Image.Image | None, text: str = "What is in the picture?") -> list[int]:
    """Our greedy token ids (the same stop rules: EOS or MAX_TOKENS)."""
    batch = engine.prepare([ChatRequest([{"role": "user", "content": text}], image)])
    with torch.inference_mode():
        out = engine.model.generate(**batch, **engine._generation_kwargs(MAX_TOKENS, 0.0, 1.0, None))
    ids = out[0, batch["input_ids"].shape[1]:].tolist()
    eos = engine.tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def chat(base: str, image: Image.Image | None, text: str = "What is in the picture?", **extra) -> httpx.Response:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": _png(image)}})
    body = {"model": "piip", "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "return_token_ids": True, **extra}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)


def test_greedy_tokens_equal_generate_and_images_matter(vllm_server, engine):
    got = {}
    for name, image in IMAGES.items():
        r = chat(vllm_server, image)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        expected = ours(engine, image)
        served = choice["token_ids"]
        if served and served[-1] != engine.tokenizer.eos_token_id and expected[-1:] == [engine.tokenizer.eos_token_id]:
            served = served + [engine.tokenizer.eos_token_id]  # vLLM leaves the stop token out
        assert served == expected, name
        # the prompt vLLM built (one-pass tokenisation + image replacement) is ours, BOS and visual tokens included
        assert r.json()["prompt_token_ids"] == engine.prepare([ChatRequest(
            [{"role": "user", "content": "What is in the picture?"}], image)])["input_ids"][0].tolist()
        got[name] = choice["message"]["content"]
    assert len(set(got.values())) == len(got), got  # two images, two answers
    text_only = chat(vllm_server, None)
    assert text_only.status_code == 200 and text_only.json()["choices"][0]["token_ids"][:MAX_TOKENS - 1] == \
        ours(engine, None)[:MAX_TOKENS - 1]


def test_streaming_gives_the_same_text(vllm_server):
    whole = chat(vllm_server, IMAGES["stripes"]).json()["choices"][0]["message"]["content"]
    deltas = []
    with httpx.stream("POST", f"{vllm_server}/v1/chat/completions", timeout=300, json={
            "model": "piip", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png(IMAGES["stripes"])}},
                                                      {"type": "text", "text": "What is in the picture?"}]}]}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    deltas.append(chunk["choices"][0]["delta"].get("content") or "")
    # one chunk per token (a random model's ids past the small tokenizer decode to ""), same text as unstreamed
    assert len(deltas) >= MAX_TOKENS - 1 and "".join(deltas) == whole


def test_bad_image_is_a_client_error(vllm_server):
    bad = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    r = httpx.post(f"{vllm_server}/v1/chat/completions", timeout=120, json={
        "model": "piip", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": bad}}, {"type": "text", "text": "hi"}]}]})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert httpx.get(f"{vllm_server}/health", timeout=5).status_code == 200  # still serving
