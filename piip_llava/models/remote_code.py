"""Self-contained checkpoints: the model, config and processor code written next to the weights.

`save_pretrained` of the model and of the processor calls `write_remote_code`, so every checkpoint this project
writes (training output, converter, merge) loads with `transformers` alone:
`AutoModelForImageTextToText.from_pretrained(ckpt, trust_remote_code=True)` and `AutoProcessor.from_pretrained(ckpt,
trust_remote_code=True)`; vLLM's Transformers backend serves it the same way. The files are this package's own
modules, flattened into one folder (transformers' dynamic modules resolve only `from .module import` within the
checkpoint folder), with the package-relative imports rewritten accordingly. Needs torch, transformers, PIL and
numpy; ConvNeXt branches also need timm.
"""
from __future__ import annotations

import os
import re

from .configuration_piip_llava import AUTO_MAP, REMOTE_CODE_FILES

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# file in the checkpoint -> file in this package
BUNDLE = {
    "configuration_piip_llava.py": "models/configuration_piip_llava.py",
    "modeling_piip_llava.py": "models/modeling_piip_llava.py",
    "modeling_piip_vision.py": "models/modeling_piip_vision.py",
    "processing_piip_llava.py": "models/processing_piip_llava.py",
    "interaction.py": "layers/interaction.py",
    "deform_attn.py": "layers/deform_attn.py",
    "conversation.py": "data/conversation.py",
    "constants.py": "constants.py",
}
assert tuple(BUNDLE) == REMOTE_CODE_FILES

PROCESSOR_AUTO_MAP = {"AutoProcessor": AUTO_MAP["AutoProcessor"]}
IMAGE_PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "processing_piip_llava.PiipLlavaImageProcessor",
    "AutoProcessor": AUTO_MAP["AutoProcessor"],
}

_IMPORT = re.compile(r"^(\s*from\s+)(\S+)(\s+import\b)", re.MULTILINE)
_BY_MODULE = {path[:-3].replace("/", "."): name[:-3] for name, path in BUNDLE.items()}  # "layers.interaction" -> "interaction"


def _rewrite_import(match: re.Match, here: str) -> str:
    target = match.group(2)
    if target.startswith("piip_llava."):
        module = target[len("piip_llava."):]
    elif target.startswith("."):
        dots = len(target) - len(target.lstrip("."))
        base = here.split(".")[:-dots] if dots > 1 else here.split(".")[:-1]
        module = ".".join(base + [target.lstrip(".")]) if target.lstrip(".") else ".".join(base)
    else:
        return match.group(0)
    if module not in _BY_MODULE:
        raise ValueError(f"{here}: import of {target!r} is not part of the remote-code bundle {sorted(BUNDLE)}")
    return f"{match.group(1)}.{_BY_MODULE[module]}{match.group(3)}"


def bundle_source(name: str) -> str:
    """The text of checkpoint file `name`: the package module with its imports made folder-relative."""
    path = BUNDLE[name]
    here = path[:-3].replace("/", ".")
    with open(os.path.join(_PACKAGE, path), encoding="utf-8") as f:
        text = f.read()
    out = _IMPORT.sub(lambda m: _rewrite_import(m, here), text)
    header = f"# Generated from piip_llava/{path} by piip_llava.models.remote_code; edit the package, not this copy.\n"
    return header + out


def write_remote_code(out_dir: str) -> list[str]:
    """Write the bundle into `out_dir`; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name in BUNDLE:
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(bundle_source(name))
        written.append(path)
    return written
