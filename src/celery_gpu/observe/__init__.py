"""Observability of the worker's pool: its counters and histograms (``telemetry``), live device readings
(``readings``), the status snapshot every reader shares (``snapshot``), ``celery inspect gpu`` and the
``worker-gpu`` event (``control``), and the Prometheus exporter (``metrics``). Runs in the worker's main process;
imports nothing above the core modules."""
