"""The ``lb-dist`` console script: ``lb-dist train ...``, ``lb-dist plot RUN_DIR ...`` and ``lb-dist reproduce EXPERIMENT ...``."""
from __future__ import annotations

import sys

USAGE = """usage: lb-dist {train,plot,reproduce} ...

  lb-dist train ...          train a model (lb-dist train --help; docs/training.md)
  lb-dist plot RUN_DIR ...   PNG figures comparing runs (lb-dist plot --help)
  lb-dist reproduce EXP ...  the papers' experiments as sets of runs, aggregated over seeds (docs/results.md)
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from lb_dist.train import main as train_main
        return train_main(rest, prog="lb-dist train")
    if command == "plot":
        from lb_dist.plot import main as plot_main
        return plot_main(rest, prog="lb-dist plot")
    if command == "reproduce":
        from lb_dist.reproduce import main as reproduce_main
        return reproduce_main(rest, prog="lb-dist reproduce")
    print(USAGE, end="", file=sys.stderr)
    print(f"lb-dist: error: unknown command {command!r} (choose from train, plot, reproduce)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
