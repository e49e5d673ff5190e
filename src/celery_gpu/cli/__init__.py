"""The ``celery-gpu`` command: ``worker`` (a Celery worker on the GPU pool), ``status`` (every worker's devices)
and ``demo``."""

from .main import main

__all__ = ["main"]
