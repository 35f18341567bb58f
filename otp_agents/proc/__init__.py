"""One OS process: ``spawn`` starts it (cold, or forked by a zygote), ``session`` runs a worker's
handshake, ``handle`` watches it with a pidfd and runs the stop ladder; ``guard`` and ``cgroup``
contain the tree if the supervisor dies; ``reaper`` handles adopted orphans. It never imports the
engine or the monitors."""
