"""Build the optional C hot path; everything else is in pyproject.toml.

``optional=True``: if the compiler or the Python headers are missing, the
install still succeeds and shmpool runs on its pure-Python twin.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmpool._speedups",
            ["shmpool/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
        )
    ]
)
