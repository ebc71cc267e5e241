"""The subcommands of ``sla-bench``, one module each (see :mod:`..cli`)."""
