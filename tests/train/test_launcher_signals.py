"""Stopping the launch script stops the training it started: SIGTERM, SIGKILL and SIGINT (Ctrl-C) of the script's
process group, with one and with two torchrun workers (loopback only). torchrun runs its workers in sessions of their
own, so a group SIGKILL reaches only the script and torchrun; the workers must notice and exit by themselves."""
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from piip_llava.testing import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARK = "PIIP_TEST_RUN_TOKEN"  # every process the launch starts inherits it: found in /proc/*/environ


def processes_with(token: str) -> list[int]:
    """Live processes whose environment carries MARK=token (zombies have an empty environ)."""
    needle = f"{MARK}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def wait_for(predicate, timeout: float, period: float = 0.25) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(period)
    return predicate()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_training import write_records

    root = str(tmp_path_factory.mktemp("signal_data"))
    return {"root": root, **write_records(root)}


def start_training(tmp_path, data, tokenizer_dir, nproc: int, token: str):
    out = str(tmp_path / "out")
    log_path = str(tmp_path / "launch.log")
    env = dict(os.environ, PYTHON=sys.executable, NPROC=str(nproc), MASTER_PORT=str(free_port()),
               PRESET="tiny-piip2_clip_64-128", TOKENIZER_PATH=tokenizer_dir, DATA_PATH=data["stage2"],
               IMAGE_FOLDER=data["root"], OUTPUT_DIR=out, PER_DEVICE_BATCH="2", GRAD_CKPT="false", ZERO="none",
               LR="1e-3", EPOCHS="1000", SAVE_STEPS="100000", LOGGING_STEPS="1", **{MARK: token})
    env.pop("GLOBAL_BATCH", None)
    log = open(log_path, "w")  # noqa: SIM115 (closed by the caller)
    proc = subprocess.Popen(["bash", os.path.join(REPO, "scripts", "finetune_piip_llava.sh")], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log, log_path, out


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def kill_everything(proc, token) -> None:
    """Cleanup after a signal test: SIGKILL every process of the run and the script's group, whatever is left."""
    for pid in processes_with(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc", [("SIGKILL", 2), ("SIGKILL", 1), ("SIGTERM", 2), ("SIGTERM", 1),
                                        ("SIGINT", 2), ("SIGINT", 1)])
def test_stopping_the_launch_script_stops_its_training(tmp_path, data, tokenizer_dir, name, nproc):
    sig = getattr(signal, name)
    token = uuid.uuid4().hex
    proc, log, log_path, out = start_training(tmp_path, data, tokenizer_dir, nproc, token)
    try:
        # mid-training: every worker is running its steps (the log line of step 3 comes from rank 0)
        assert wait_for(lambda: "step 3/" in read(log_path) or proc.poll() is not None, 240), read(log_path)[-3000:]
        assert proc.poll() is None, read(log_path)[-3000:]
        before = processes_with(token)
        assert len(before) >= 2 + nproc, before  # bash, torchrun and the workers (at least)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
        assert wait_for(lambda: not processes_with(token), 45), (
            f"still running after {sig.name}: {processes_with(token)}\n" + read(log_path)[-3000:])
        # nothing trained to the end or wrote the final model
        assert not os.path.exists(os.path.join(out, "model.safetensors"))
        assert "final checkpoint" not in read(log_path)
        if sig == signal.SIGKILL:  # a worker stopped itself and said why (a second one may fail on its peer first)
            assert "has exited: stopping training process" in read(log_path), read(log_path)[-3000:]
    finally:
        kill_everything(proc, token)
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_sigkill_of_the_script_alone_stops_torchrun_and_workers(tmp_path, data, tokenizer_dir):
    """`kill -9 <script pid>` (not the group): torchrun lives on, the workers see the script gone, torchrun follows."""
    token = uuid.uuid4().hex
    proc, log, log_path, out = start_training(tmp_path, data, tokenizer_dir, 2, token)
    try:
        assert wait_for(lambda: "step 3/" in read(log_path) or proc.poll() is not None, 240), read(log_path)[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert wait_for(lambda: not processes_with(token), 60), processes_with(token)
        assert not os.path.exists(os.path.join(out, "model.safetensors"))
    finally:
        kill_everything(proc, token)
        log.close()


def test_a_bad_model_path_fails_before_torchrun_with_one_line(tmp_path, data):
    env = dict(os.environ, PYTHON=sys.executable, MODEL_PATH=str(tmp_path / "stage0"), DATA_PATH=data["stage2"],
               OUTPUT_DIR=str(tmp_path / "out"), NPROC="2")
    env.pop("PIIP_DEBUG", None)
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "finetune_piip_llava.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: MODEL_PATH {tmp_path / 'stage0'}: no such folder; give the folder that holds config.json and the "
        "weights: a training OUTPUT_DIR after training finished, one of its checkpoint-N folders, or the output of "
        "convert_official / merge_lora. A checkpoint on the Hugging Face Hub must be downloaded first "
        "(hf download ORG/NAME --local-dir DIR)"]
    assert "torch.distributed" not in proc.stdout + proc.stderr and not os.path.exists(tmp_path / "out")


def test_only_a_launcher_on_this_host_is_watched():
    from piip_llava.train.lifeline import launch_script_pid, watch_launcher

    host = socket.gethostname()
    assert launch_script_pid({"PIIP_LAUNCHER": f"{host}:4242"}) == 4242
    assert launch_script_pid({"PIIP_LAUNCHER": "another-node:4242"}) is None  # a remote node's pid means nothing here
    assert launch_script_pid({"PIIP_LAUNCHER": "garbage"}) is None
    assert watch_launcher({}) is None  # `python -m piip_llava.train` without a launcher (e.g. under nohup)


def test_a_worker_whose_launch_script_is_gone_exits(tmp_path):
    """A child process watching a pid that has exited stops by itself with status 1 and says why."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    code = ("import time; from piip_llava.train.lifeline import watch_launcher; "
            "assert watch_launcher(period=0.1) is not None; time.sleep(30)")
    env = dict(os.environ, PIIP_LAUNCHER=f"{socket.gethostname()}:{gone.pid}")
    env.pop("LOCAL_RANK", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.monotonic() - t0 < 25
    assert f"the launch script (pid {gone.pid}) has exited: stopping training process" in proc.stderr
