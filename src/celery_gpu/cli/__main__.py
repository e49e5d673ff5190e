"""``python -m celery_gpu.cli``: the ``celery-gpu`` command."""

import sys

from .main import main

sys.exit(main())
