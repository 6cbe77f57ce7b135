"""The ``phivault`` command: parses, calls services, prints. Nothing imports it."""
