"""HTTP: the FastAPI app factory, problem responses, security headers, the TLS server."""
