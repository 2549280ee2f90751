"""Package list for setuptools (the rest of the metadata is in pyproject.toml).

Every package under fastflow/ is found automatically, so a new subpackage cannot be left
out of the wheel. ``fastflow.kernels`` lives in the top-level ``kernels/`` folder (mapped in
pyproject.toml's [tool.setuptools.package-dir]), which find_packages cannot see under
fastflow/, so it and any subpackage of kernels/ are added here."""

from setuptools import find_packages, setup

KERNELS = ["fastflow.kernels"] + [f"fastflow.kernels.{p}" for p in find_packages("kernels")]

setup(packages=find_packages(include=["fastflow", "fastflow.*"]) + KERNELS)
