"""``python -m lb_dist.train ...`` (the same as ``lb-dist train ...``)."""
import sys

from lb_dist.train import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m lb_dist.train"))
