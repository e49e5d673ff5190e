"""What a producer sees of GPU tasks: ``submit_many`` and the arrays serializer by default (``submit``), and what
a batched task is (``batched``: ``RetryItem``, ``BatchOptions``, the per-item ``run``). Runs in the client and
in the device processes; imports nothing above the payload, wire and core modules."""
