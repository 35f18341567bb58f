"""The tree file, typed: ``model`` (msgspec Structs, the schema), ``load`` (TOML to a validated
:class:`~otp_agents.spec.model.SupervisorSpec`, with one-line errors naming the key path) and
``describe`` (what ``otp-agents check`` prints)."""
