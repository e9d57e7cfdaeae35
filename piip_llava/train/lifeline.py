"""A training process ends when the launcher that started it is gone.

torchrun starts every worker in a session of its own (torch.distributed.elastic's `start_new_session=True`), so a
SIGKILL of the launch script's process group ends the script and torchrun but not the workers: re-parented, they
would train on and write checkpoints and the final model into OUTPUT_DIR, next to the run the operator starts next.
SIGTERM and SIGINT are forwarded by torchrun itself; SIGKILL cannot be forwarded by anyone.

`watch_launcher` starts a daemon thread that ends this process (exit status 1, one line on stderr) within about a
second after its parent (the launcher: torchrun, `deepspeed.launcher.launch`) or the launch script named by
`PIIP_LAUNCHER=HOST:PID` (exported by scripts/launch_train.sh; checked on that host only) has exited. A training run
started without a launcher (`python -m piip_llava.train`, e.g. under nohup) is not watched.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Mapping

LAUNCHER_ENV = "PIIP_LAUNCHER"


def _start_time(pid: int) -> str | None:
    """Start time of `pid` from /proc (None where there is no /proc): tells a reused pid from the launcher's."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start_time is None or _start_time(pid) == start_time


def launch_script_pid(env: Mapping[str, str] = os.environ) -> int | None:
    """The launch script's pid from `PIIP_LAUNCHER=HOST:PID` when HOST is this machine."""
    host, _, pid = env.get(LAUNCHER_ENV, "").rpartition(":")
    if not pid.isdigit() or host != socket.gethostname():
        return None
    return int(pid)


def watch_launcher(env: Mapping[str, str] = os.environ, period: float = 0.5) -> threading.Thread | None:
    """Exit this process when its launcher is gone (see the module doc); returns the watching thread, if any."""
    parent = os.getppid() if "LOCAL_RANK" in env else None  # set by torchrun / deepspeed / accelerate launchers
    script = launch_script_pid(env)
    if parent is None and script is None:
        return None
    script_start = _start_time(script) if script is not None else None

    def watch() -> None:
        while True:
            time.sleep(period)
            if parent is not None and os.getppid() != parent:
                gone = f"its launcher (pid {parent})"
            elif script is not None and not _alive(script, script_start):
                gone = f"the launch script (pid {script})"
            else:
                continue
            rank = env.get("RANK", "?")
            print(f"[piip_llava] {gone} has exited: stopping training process {os.getpid()} (rank {rank}); "
                  "resume later with --resume auto", file=sys.stderr, flush=True)
            os._exit(1)  # no clean-up: nothing may be written after the launcher is gone

    thread = threading.Thread(target=watch, name="piip-launcher-watch", daemon=True)
    thread.start()
    return thread
