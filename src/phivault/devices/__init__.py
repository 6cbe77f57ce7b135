"""Devices: activation codes, device keys, DPoP-bound tokens and resumable uploads."""
