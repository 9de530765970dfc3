"""Thin per-framework adapters over legato.core: torch, tensorflow, mxnet.

Import the one you need (`import legato.adapters.torch`); each raises ImportError naming the
extra to install when its framework is missing.
"""
