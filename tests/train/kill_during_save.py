"""Run `python -m piip_llava.train ARGS...` and SIGKILL the process at one moment of the save of checkpoint-STEP.

    python tests/train/kill_during_save.py MOMENT STEP ARGS...

MOMENT: `weights_written` (model and configs on disk, no optimizer state yet), `before_trainer_state` (everything but
trainer_state.json, the Trainer's last file), `after_publish` (the checkpoint renamed into place, before the old ones
are rotated out). The hooks wrap library functions in this helper process only; SIGKILL gives the code under test no
chance to clean up, as in a real crash.
"""
import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(moment: str, step: int) -> None:
    name = f"checkpoint-{step}"
    if moment == "weights_written":
        import torch

        save = torch.save

        def killing_save(obj, f, *args, **kwargs):
            if str(f).endswith("optimizer.pt") and name in str(f):
                die()
            return save(obj, f, *args, **kwargs)

        torch.save = killing_save
    elif moment == "before_trainer_state":
        from transformers import TrainerState

        save_to_json = TrainerState.save_to_json

        def killing_save_to_json(self, path):
            if name in path:
                die()
            return save_to_json(self, path)

        TrainerState.save_to_json = killing_save_to_json
    elif moment == "after_publish":
        import piip_llava.train.trainer as trainer_module

        rotate = trainer_module.rotate_checkpoints

        def killing_rotate(output_dir, keep, newest, *args, **kwargs):
            if newest.endswith(name):
                die()
            return rotate(output_dir, keep, newest, *args, **kwargs)

        trainer_module.rotate_checkpoints = killing_rotate
    else:
        raise SystemExit(f"unknown moment {moment}")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    from piip_llava.train.train import main

    raise SystemExit(main(sys.argv[3:]))
