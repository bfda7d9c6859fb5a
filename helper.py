"""The course's ``helper.py``: its functions with the course's and the seed's names and
signatures.  They live in ``roadseg.course``; this file keeps ``import helper`` working."""
from roadseg.course import *  # noqa: F401,F403
from roadseg.course import __all__  # noqa: F401
