"""`python -m piip_llava.train`: see `piip_llava.train.train`."""
from .train import main

if __name__ == "__main__":
    raise SystemExit(main())
