"""Kept for importers of the old path; the task lives in :mod:`piip_llava.evaluation.tasks.textvqa`."""
from piip_llava.evaluation.tasks.textvqa import *  # noqa: F401,F403
from piip_llava.evaluation.tasks.textvqa import __all__  # noqa: F401
