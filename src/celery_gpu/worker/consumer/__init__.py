"""Everything that reaches into Celery's and kombu's consumer internals in the worker's main process: the task
strategy of GPU tasks (``strategy``: malformed messages failed by name, acks in bulk), the ack buffer
(``acks``), prefetch room for batches (``prefetch``) and receiving from Redis in bulk (``receive``). Kept here so
that what depends on Celery's private surface is in one place."""
