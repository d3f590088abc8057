"""dar's test suite, a package so its shared helpers import as ``tests.support.*``.

Because this folder holds an ``__init__.py``, pytest (default "prepend" import mode) puts the folder above the
outermost package -- the checkout's root -- on ``sys.path`` and imports each test as ``tests.<folder>.<file>``;
the root's ``kernels/`` and ``bindings/`` folders then resolve as ``dar/_toplevel.py`` describes
(tests/tooling/test_packaging.py). The test folders are packages too, so equal file names in two folders
(``backends/test_triton.py``, ``varlen/test_triton.py``) are distinct modules.
"""
