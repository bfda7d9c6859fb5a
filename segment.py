#!/usr/bin/env python
"""Command line of the project: ``python segment.py <command> --help`` (after
``pip install -e .`` also ``segment <command>``).  Everything lives in ``roadseg.cli``."""
import sys

from roadseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
