"""The wire: the framed protocol both sides speak (messages, framing, channel) and the vocabulary
they share (``env``: variable names, the dump signal, exit codes; ``zygote``: the fork protocol;
``peer``: who is at the other end of a socket). Imports nothing else of the package."""
