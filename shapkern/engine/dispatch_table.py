"""The engine's measured routes (see :mod:`shapkern.engine.dispatch`), written by
``python -m benchmarks.dispatch_table`` from GPU throughput runs committed under benchmarks/results/.

Empty: no GPU run has measured the engine's routes yet (issue 24), so every call takes the default.
"""

from shapkern.engine.dispatch import Route

ROUTES: tuple[Route, ...] = ()
