#!/usr/bin/env python
"""Train and evaluate c2f: `accelerate launch run_retrieval.py [--args]` (the Hub-examples-style entry point).

The code lives in `c2f/train.py`, so the installed package trains too: `c2f-train [--args]` is the same program.
"""

from c2f.train import *  # noqa: F401,F403  (scripts and tests use the program's parts from here)
from c2f.train import main

if __name__ == "__main__":
    main()
