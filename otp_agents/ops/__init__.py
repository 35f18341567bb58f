"""The operator plane: the control socket (``control``, ``control_client``), ``status``, Prometheus
``metrics``, the checks made before a run (``preflight``), signals, and ``serve``, the loop of
``otp-agents run``. Nothing below imports it."""
