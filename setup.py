"""Builds the C++ CPU kernels (csrc/) into ``mixq._C`` at install time.

Set MIXQ_NO_EXT=1 to install without the extension (the reference backend then serves CPU).
"""

import glob
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob("csrc/*.cpp"))
if sources and os.environ.get("MIXQ_NO_EXT") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # No fast-math and no FP contraction: the kernels must round exactly like the reference.
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off"]
    if os.environ.get("MIXQ_DEBUG_EXT") == "1":
        cxx = ["-O0", "-g", "-fopenmp", "-std=c++20", "-ffp-contract=off"]
    ext_modules = [
        CppExtension(
            "mixq._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
