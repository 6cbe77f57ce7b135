"""Settings, profiles and compliance guardrails."""
