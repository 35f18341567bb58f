"""``python -m otp_agents.zygote --image NAME [--preload MODULES] [--idle N]``: the zygote program."""

import sys

from otp_agents.zygote.program import main

sys.exit(main())
