"""The installed distribution: no generic top-level packages, package data for first-use builds."""

import importlib.metadata

import pnnh_kernels


def _files():
    return [str(f) for f in importlib.metadata.distribution("pnnh_kernels").files or []]


def test_no_generic_top_level_packages():
    top_level = {f.split("/")[0] for f in _files() if f.endswith(".py")}
    assert top_level == {"pnnh_kernels"}, top_level


def test_version_is_exposed():
    assert pnnh_kernels.__version__ == importlib.metadata.version("pnnh_kernels")


def test_the_package_says_it_is_typed():
    # PEP 561: without the marker, type checkers ignore the installed package's annotations
    assert "pnnh_kernels/py.typed" in _files()
