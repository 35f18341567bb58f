#!/bin/sh
# A plain-command test worker driven by signals:
#   SIGUSR1 -> exit 0 (normal exit), SIGUSR2 -> exit 3 (crash), SIGTERM -> exit 0.
#   With IGNORE_TERM=1 it ignores SIGTERM (to test the SIGKILL step of the stop ladder).
trap 'exit 0' USR1
trap 'exit 3' USR2
if [ "${IGNORE_TERM:-0}" = 1 ]; then trap '' TERM; else trap 'exit 0' TERM; fi
while :; do
  sleep 3600 &
  wait $!
done
