"""HTTP load generator for a running dlp server; the same as `dlp bench load`.

    python benchmarks/load.py --concurrency 8 --duration 60            # closed loop
    python benchmarks/load.py --rate 4 --duration 60 --stream-fraction 0.5   # open loop
    python benchmarks/load.py --concurrency 192 --processes 4 --duration 60  # many clients
    -> benchmarks/results/load.json + load.png

The code lives in dlp/loadgen.py (so the installed `dlp` command has it too).
"""

from __future__ import annotations

import argparse
import sys

from dlp.cli import main as dlp_main


def main(argv: list[str] | None = None) -> int:
    # Run through the dlp CLI so errors print as one line with exit code 2, like `dlp bench`.
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        parser = argparse.ArgumentParser(prog="benchmarks/load.py", description=__doc__)
        from dlp.loadgen import add_load_arguments

        add_load_arguments(parser)
        parser.print_help()
        return 0
    return dlp_main(["bench", "load", *args])


if __name__ == "__main__":
    sys.exit(main())
