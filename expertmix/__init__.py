"""Shared leaf of the expertmix distribution: the error tree and small I/O helpers.

``orchestrator``, ``experts`` and ``router_training`` all import from here; this
package imports none of them, so the import direction stays one way.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
