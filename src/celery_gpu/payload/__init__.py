"""What task messages carry: the arrays serializer (``arrays``), the claim-check reference for payloads too large
for a message (``claims``) and the stores that keep them (``stores``). Used by producers and by both worker
processes; imports nothing above the wire and core modules."""
