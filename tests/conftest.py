import os
import sys

from hypothesis import settings

# tests import the independent reference helpers (brute.py) by name
sys.path.insert(0, os.path.dirname(__file__))

# CI runs a fixed set of examples so a red build is reproducible; `HYPOTHESIS_PROFILE=explore pytest` draws fresh ones
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
