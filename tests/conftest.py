import os
import sys

# The project is a flat set of modules at the repository root: make them importable from tests/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
