import os
import sys

# tests import the independent reference helpers (brute.py) by name
sys.path.insert(0, os.path.dirname(__file__))
