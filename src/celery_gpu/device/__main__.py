"""``python -m celery_gpu.device``: the entry point of a device process (see :mod:`celery_gpu.device.main`)."""

from .main import main

main()
