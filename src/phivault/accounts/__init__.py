"""Accounts: institutions (tenants), users, roles and permissions, passwords, TOTP MFA,
rotating sessions, throttling and password reset (DESIGN.md §5, docs/accounts.md).
"""
