"""Python child processes that run this project's code, and nothing from the caller's directory.

Root runs ``vswapctl up`` from wherever it happens to stand.  ``python -m
hoststore`` there puts that directory first on the child's ``sys.path``, so an
``argparse.py`` or a ``trio.py`` lying in it would run inside a swap daemon, as
root.  Every Python child vswapctl starts (the daemons, the workload, the
benchmarks' helpers) therefore starts

* isolated (``python -I``): neither the working directory nor ``PYTHONPATH`` nor
  the user's site-packages is on its ``sys.path``; the interpreter's own
  site-packages is, with its ``.pth`` files, so an editable install's finder
  (tools/bootstrap.sh installs the project editable) still works;
* in ``/``, so that nothing it opens by a relative name comes from the caller's
  directory either (paths handed to it must be absolute);
* with the directory this package was imported from appended *last* to its
  ``sys.path``: a source checkout, an editable install and a normal one all run
  the very code of the vswapctl that starts them, and nothing in that directory
  can shadow the standard library or an installed dependency.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

WORKDIR = "/"
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `python -I -c BOOT ROOT MODULE ARG...` does what `python -m MODULE ARG...` does (runpy is
# what -m uses), after appending ROOT to sys.path.
_BOOT = ("import runpy, sys; sys.path.append(sys.argv.pop(1)); "
         "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def module_argv(module: str, *args: str) -> list[str]:
    """The command line that runs ``python -m module args...`` isolated (see the module's doc);
    run it with ``cwd=WORKDIR``."""
    return [sys.executable, "-I", "-c", _BOOT, SOURCE_ROOT, module, *args]


def popen(module: str, *args: str, **kwargs: Any) -> subprocess.Popen[Any]:
    """``module`` as a child process, isolated and in ``/``; ``kwargs`` are Popen's."""
    return subprocess.Popen(module_argv(module, *args), cwd=WORKDIR, **kwargs)
