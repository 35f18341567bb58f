from otp_agents.cli import main

main()
