"""Fusion benchmark (issue 4 items 5-7): `python benchmarks/fusion_bench.py [--device cpu]`.

Same as `dlp bench fusion`; the core lives in dlp/engine/bench_fusion.py. Runs every variant
(a)-(g) side by side in one process and writes benchmarks/results/fusion_h200.json (GPU) or
fusion_cpu.json (CPU) plus a PNG beside it. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dlp.engine.bench_fusion import add_arguments, cli_main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    args = parser.parse_args()
    args.command_line = "python benchmarks/fusion_bench.py " + " ".join(sys.argv[1:])
    sys.exit(cli_main(args))
