"""Object store: where encrypted objects live. ``open_object_store`` picks the backend."""
