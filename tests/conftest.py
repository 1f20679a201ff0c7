"""Shared pytest setup: tests import helpers from this folder (multirank.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
