"""Exams: the ingest pipeline, the PHI store, quotas, quarantine (DESIGN.md §3)."""
