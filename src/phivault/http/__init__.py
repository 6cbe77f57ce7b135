"""What every HTTP route shares: the problem error type and the route dependencies.

Domain ``api.py`` modules import from here; nothing imports ``phivault.web``.
"""
