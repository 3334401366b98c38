import os
import sys

# tests/ helpers (reference.py, spawn harness) import as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
