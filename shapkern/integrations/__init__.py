"""Bridges from shapkern to other explanation libraries, one module per library.

- :mod:`shapkern.integrations.shapiq`: a ``shapiq.Game`` that evaluates one image's coalitions
  through shapkern's value function, so shapiq's approximators and interaction indices run on the
  packed engine. Needs ``pip install shapiq`` (or ``pip install 'shapkern[shapiq]'``).

This package imports nothing itself: each module imports its library when it is imported.
"""
