"""Shared leaf of the expertmix distribution: the error tree and small I/O helpers.

``orchestrator``, ``experts`` and ``router_training`` all import from here; this
package imports none of them, so the import direction stays one way.
"""

from __future__ import annotations

from expertmix.runtime import openmp_defaults

__version__ = "0.1.0"

openmp_defaults()  # before any torch import (see expertmix/runtime.py)

__all__ = ["__version__"]
