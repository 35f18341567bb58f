"""A worker that says whatever the test tells it: the bytes in argv[1] (hex) go to the channel,
then it either exits (argv[2] == "exit") or waits for the channel to close."""

import contextlib
import os
import sys

fd = int(os.environ["OTP_AGENTS_FD"])
data = bytes.fromhex(sys.argv[1])
with contextlib.suppress(OSError):
    os.write(fd, data)
if sys.argv[2] == "exit":
    sys.exit(0)
while os.read(fd, 65536):  # until the supervisor closes the channel (or kills us)
    pass
