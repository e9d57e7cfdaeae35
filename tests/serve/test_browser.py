"""A real headless Chromium loads the Gradio demo, uploads an image, sends a message and sees the model's answer.

Needs the Debian `chromium` package (/usr/bin/chromium) and the `playwright` Python package (no `playwright install`).
"""
import os

import pytest

from piip_llava.serve.inference import ChatRequest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
MAX_NEW = 12

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install -y chromium)"),
]


def test_browser_upload_send_and_see_answer(engine, images, free_port, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from piip_llava.serve.gradio_demo import build_demo

    question = "What is in this picture?"
    want = engine.generate([ChatRequest([{"role": "user", "content": question}], engine.open_image(images["red"]))],
                           MAX_NEW, 0.0)[0]
    assert want
    demo = build_demo(engine, max_new_tokens=MAX_NEW, temperature=0.0)
    demo.launch(server_name="127.0.0.1", server_port=free_port, prevent_thread_lock=True, quiet=True)
    shot = tmp_path / "gradio_chat.png"
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{free_port}/", wait_until="networkidle", timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(images["red"])
            page.locator("img[src*='red']").first.wait_for(timeout=30_000)  # the preview of the upload
            page.get_by_label("Message", exact=True).first.fill(question)
            page.get_by_role("button", name="Send", exact=True).click()
            bot = page.locator("[data-testid='bot']").last
            bot.wait_for(timeout=60_000)
            # wait until streaming has finished: the bot bubble shows the whole greedy answer
            page.wait_for_function(
                "([sel, want]) => { const els = document.querySelectorAll(sel);"
                " return els.length && els[els.length - 1].innerText.trim() === want; }",
                arg=["[data-testid='bot']", want], timeout=120_000)
            user_text = page.locator("[data-testid='user']").last.inner_text().strip()
            bot_text = bot.inner_text().strip()
            page.screenshot(path=str(shot), full_page=True)

            # bad input in the browser: an empty message shows an error toast, the app keeps working
            page.get_by_label("Message", exact=True).first.fill("   ")
            page.get_by_role("button", name="Send", exact=True).click()
            page.get_by_text("Type a message first.").first.wait_for(timeout=30_000)
            still_there = page.locator("[data-testid='bot']").last.inner_text().strip()
            page.screenshot(path=str(tmp_path / "gradio_empty_message.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"screenshot: {shot}")
    assert user_text == question
    assert bot_text == want
    assert still_there == want  # a refused message leaves the conversation on screen
    assert shot.stat().st_size > 10_000
