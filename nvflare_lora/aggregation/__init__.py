"""LoRA-aware aggregation: the server's maths (rules.py) and a site's half of a rule (site.py)."""

from .rules import *  # noqa: F401,F403
from .rules import __all__  # noqa: F401
