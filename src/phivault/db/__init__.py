"""Database access: engines and sessions, Alembic migrations, the job queue."""
