"""hbmon: heartbeats through mirrored storage volumes and the network (US 7,275,100)."""

from __future__ import annotations

__version__ = "0.1.0"
