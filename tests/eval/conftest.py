import os
import sys

# The evaluation tests import their shared doubles (eval_fakes.py) as a top-level module.
sys.path.insert(0, os.path.dirname(__file__))
