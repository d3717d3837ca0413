"""Build entry point. Metadata lives in pyproject.toml; this file exists for the optional compiled extension."""

from setuptools import setup

setup()
