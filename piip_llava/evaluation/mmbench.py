"""Kept for importers of the old path; the task lives in :mod:`piip_llava.evaluation.tasks.mmbench`."""
from piip_llava.evaluation.tasks.mmbench import *  # noqa: F401,F403
from piip_llava.evaluation.tasks.mmbench import __all__  # noqa: F401
