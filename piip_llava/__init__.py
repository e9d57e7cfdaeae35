"""piip_llava: train, chat with and evaluate PIIP-LLaVA (parameter-inverted image pyramid vision towers + HF LLMs)."""
__version__ = "0.1.0"

from .models import *  # noqa: F401,F403  (registers the Auto classes)
