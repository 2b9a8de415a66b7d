"""The HTTP service (FastAPI). Kept free of imports so the trainer can be used without the server stack."""
