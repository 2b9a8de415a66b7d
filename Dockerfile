# The char-rnn service with the bundled model: `docker compose up`, or
#   docker build -t charrnn . && docker run -p 8000:8000 charrnn
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU-only build of PyTorch, in a layer of its own: the default Linux wheel pulls several GB of CUDA.
# Its C++ headers and test binaries (about 190 MB) serve no Python program; torch_shm_manager stays.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && TORCH_DIR="$(python -c 'import importlib.util; print(importlib.util.find_spec("torch").submodule_search_locations[0])')" \
    && rm -rf "${TORCH_DIR}/include" "${TORCH_DIR}/test" \
    && find "${TORCH_DIR}/bin" -mindepth 1 ! -name torch_shm_manager -delete

WORKDIR /app

# The project, from pyproject.toml (torch is already satisfied), without the `train` extra: the loss-curve
# plot is all it would add (matplotlib and its fonts and images, about 100 MB). Build leftovers go.
COPY pyproject.toml README.md ./
COPY charrnn/ charrnn/
COPY training/ training/
COPY app/ app/
COPY cli/ cli/
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info \
    && useradd --create-home --uid 10001 charrnn

COPY --chown=10001:10001 model_store/ model_store/
RUN mkdir -p runs && chown 10001:10001 runs

# The allocator settings `charrnn` would otherwise set by re-executing itself (docs/benchmarks.md).
ENV CHARRNN_MODEL_STORE=/app/model_store \
    CHARRNN_RELOAD_INTERVAL_S=10 \
    MALLOC_MMAP_THRESHOLD_=4294967296 \
    MALLOC_TRIM_THRESHOLD_=4294967296 \
    CHARRNN_NO_REEXEC=1

USER 10001
EXPOSE 8000

# Python's own HTTP client: the slim image has no curl. Fails on anything but 200 from /readyz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]

# One uvicorn worker: sessions and decode loops live in the process; scale with replicas. On SIGTERM open
# streams get CHARRNN_SHUTDOWN_GRACE_S (5 s) for their final event and uvicorn exits within 7 s.
CMD ["charrnn", "serve", "--host", "0.0.0.0", "--port", "8000"]
