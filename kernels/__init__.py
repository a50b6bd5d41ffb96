"""Triton kernels of mu_fast, installed as ``mu_fast.kernels`` (one kernel per file, launcher beside it).

This folder is never the top-level package ``kernels``: that name belongs to Hugging Face's ``kernels`` package,
which bitsandbytes and transformers import. When the repository root is on ``sys.path`` (``python -m pytest`` or
``python -c`` run from it), ``import kernels`` finds this folder first; the guard below then hands the import to the
real package if one is installed, and otherwise leaves an empty stand-in that looks like what Python makes of a
folder without ``__init__.py`` (no ``__file__``, no version, no submodules: transformers then counts the package as
not installed), from which ``from kernels import get_kernel`` fails with ImportError as a missing package would.
"""

if __name__ == "kernels":  # imported under the wrong name: step aside
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _repo = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _repo]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.origin != __file__ and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this file runs
        _spec.loader.exec_module(_module)
    else:
        __path__ = []  # no submodules under this name
        del __file__

    del _machinery, _util, _os, _sys, _repo, _path, _spec
