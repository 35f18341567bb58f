"""The health monitors beside each process handle: ``heartbeat``, ``memory``, the lifetime limit
(``monitors``), what they do to a child (``actions``: drain, or dump and kill) and ``dump``.
They act on the process; the engine sees only how it ended."""
