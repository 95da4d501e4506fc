"""The HTTP service: FastAPI app, thin routes, the web page; models and the store are built once."""
