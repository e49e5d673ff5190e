"""The wire between the worker's main process and its device processes: frames on a socket pair with shared
memory for long byte strings (``frames``), every frame kind and the start-up description (``protocol``), task
failures as plain data (``failures``), and how a fresh interpreter finds the Celery app (``appref``).

Both sides import this package; it imports nothing above the core modules."""
