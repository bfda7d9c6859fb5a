"""pytest set-up shared by project_tests.py and tests/: quiet TensorFlow logs and
make the project's flat modules importable from any working directory."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
