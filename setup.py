"""Thin shim for users who run ``python setup.py develop``; all metadata lives in pyproject.toml."""
from setuptools import setup

setup()
