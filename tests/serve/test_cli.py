"""The terminal chat driven through its stdin in a subprocess: two turns, a too-long message, a bad /image, /image,
/reset, an unknown command, then EOF ends the session cleanly; /exit in-process."""
import io
import subprocess
import sys

from piip_llava.serve.inference import ChatRequest

MAX_NEW = 12


def answers(stdout: str) -> list[str]:
    """Each answer is printed as `ASSISTANT: <text>\\n`; notices go to stderr, so stdout holds only answers."""
    parts = stdout.split("ASSISTANT: ")
    assert parts[0] == "", stdout
    return [p[:-1] for p in parts[1:]]


def test_cli_session(tiny_ckpt, engine, images):
    script = "\n".join([
        "hello there",
        "word " * (engine.max_context + 50),  # over the context: refused, the conversation stays
        f"/image {images['not_image']}",  # refused: image and conversation stay
        "",  # empty line: ignored
        "tell me more about <image>",  # the image placeholder typed as text: refused, the conversation stays
        "tell me more about 1 2 3 4 5 6 7 8 9",
        f"/image {images['blue']}",  # new image: new conversation
        "what colour?",
        "/reset",
        "what colour?",
        "/bogus",
    ]) + "\n"  # then EOF
    proc = subprocess.run(
        [sys.executable, "-m", "piip_llava.serve.cli", "--model", tiny_ckpt, "--image", images["red"],
         "--temperature", "0", "--max-new-tokens", str(MAX_NEW), "--device", "cpu"],
        input=script, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    got = answers(proc.stdout)

    red, blue = engine.open_image(images["red"]), engine.open_image(images["blue"])

    def gen(messages, image):
        return engine.generate([ChatRequest(messages, image)], MAX_NEW, 0.0)[0]

    u1, u2, u3 = "hello there", "tell me more about 1 2 3 4 5 6 7 8 9", "what colour?"
    a1 = gen([{"role": "user", "content": u1}], red)
    a2 = gen([{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}],
             red)
    a3 = gen([{"role": "user", "content": u3}], blue)
    assert got == [a1, a2, a3, a3]
    assert len(set(got[:3])) == 3  # the turns really differ (history and image are used)
    err = proc.stderr
    assert "not a readable image" in err and "keeping the previous image" in err
    assert f"image {images['blue']} (40x80) loaded; new conversation" in err
    assert "conversation reset" in err
    assert "message not sent" in err and "context" in err
    assert "unknown command /bogus" in err
    assert "literal <image>" in err
    assert "Traceback" not in err



def test_exit_command_stops_reading(engine):
    from piip_llava.serve.cli import TerminalChat

    out, err = io.StringIO(), io.StringIO()
    chat = TerminalChat(engine, temperature=0.0, top_p=1.0, max_new_tokens=MAX_NEW, out=out, err=err)
    chat.run(io.StringIO("hi\n/exit\nnever read\n"))
    assert answers(out.getvalue()) == [engine.generate([ChatRequest([{"role": "user", "content": "hi"}])], MAX_NEW,
                                                       0.0)[0]]
    assert [m["content"] for m in chat.messages][0] == "hi" and len(chat.messages) == 2
