"""The device-side client, ``phivault-agent``. It imports nothing from the server."""
