"""The compiled part of the package: the Embree candidate engine (wt_datagen/geometry/embree_engine.cpp).

Everything else about the package is in pyproject.toml. Needs Embree 3 headers and library (Debian
``libembree-dev``) and a C++17 compiler; ``make install`` installs both.
"""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension(
            "wt_datagen.geometry.embree_engine",
            ["wt_datagen/geometry/embree_engine.cpp"],
            libraries=["embree3"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]
)
