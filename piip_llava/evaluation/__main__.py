"""``python -m piip_llava.evaluation TASK [flags]``: see :mod:`piip_llava.evaluation.cli`."""
from piip_llava.evaluation.cli import main

raise SystemExit(main())
