"""Build the optional Cython fast path in ext/.

EDGEPROXY_EXT=auto (default) builds it when a C compiler and Cython are there and
falls back to pure Python otherwise; yes makes a failed build an error; no skips it.
"""

import os

from setuptools import Extension, setup

mode = os.environ.get("EDGEPROXY_EXT", "auto").lower()
ext_modules = []
if mode != "no":
    try:
        from Cython.Build import cythonize
    except ImportError:
        if mode == "yes":
            raise
    else:
        ext_modules = cythonize(
            [Extension("edgeproxy._speedups", ["ext/_speedups.pyx"], optional=mode != "yes")],
            # embedsignature: a cdef class's __init__ shows its signature only in the class
            # docstring, which tests/test_speedups_stub.py compares with the .pyi stub
            compiler_directives={
                "language_level": 3,
                "boundscheck": False,
                "wraparound": False,
                "embedsignature": True,
            },
        )

setup(ext_modules=ext_modules)
