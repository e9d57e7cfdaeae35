"""Ask the Gradio demo about NEW synthetic images and check the answers (the quickstart's last step).

`python -m piip_llava.serve.demo_check --model DIR [--num 5]` launches the demo headless on 127.0.0.1, uploads
images rendered by `piip_llava.data.synthetic.render_question_image` with seeds that training never used, asks
their question through the demo's `/chat` API with `gradio_client` (exactly what the browser does), and prints
question, expected and given answer. Exit status 0 when at least one answer is right.
"""
from __future__ import annotations

import argparse
import os
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--num", type=int, default=5, help="number of new images to ask about")
    parser.add_argument("--question-type", default="large_word",
                        choices=["large_word", "small_word", "color", "shape", "count"])
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args(argv)

    from gradio_client import Client, handle_file

    from ..data.synthetic import render_question_image
    from ..testing import free_port
    from .gradio_demo import build_demo
    from .inference import InferenceEngine

    engine = InferenceEngine.load(args.model)
    size = engine.config.vision_config.image_size
    demo = build_demo(engine)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    right = 0
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.num):
                image, question, answer = render_question_image(args.seed + i, size, args.question_type)
                path = os.path.join(tmp, f"new_{i}.png")
                image.save(path)
                history, _, notice = client.predict(question, handle_file(path), [], 0.0, 1.0, 16, api_name="/chat")
                reply = history[-1]["content"]
                reply = reply if isinstance(reply, str) else " ".join(p.get("text", "") for p in reply)
                ok = reply.strip().strip(".").lower() == answer.lower()
                right += ok
                first_line = question.splitlines()[0]
                print(f"[demo] new image {i}: {first_line!r} -> {reply!r} (expected {answer!r}) {'OK' if ok else 'WRONG'}")
    finally:
        demo.close()
    print(f"[demo] {right}/{args.num} answers right on new synthetic images")
    return 0 if right > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
