"""legato: ML-systems techniques for the training and serving jobs people already run.

This module holds the version only and imports no framework.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
