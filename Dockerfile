# One image for the API, the workers and the migration job (docs/operations.md).
#
# TORCH_INDEX picks the torch build. The default is the CPU index (no CUDA libraries, runs on
# any host); GPU workers are built with a CUDA index, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# (docker-compose.yml passes PPML_TORCH_INDEX to the GPU workers' build).
#
# Layers go from what changes least to what changes most: torch, then the other dependencies
# read from pyproject.toml alone, then the source. A code change rebuilds only the last layer.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The service runs as an unprivileged user that owns only the data directory.
RUN groupadd --system --gid 10001 ppml \
 && useradd --system --uid 10001 --gid ppml --home-dir /home/ppml --create-home ppml \
 && mkdir /data /shared \
 && chown ppml:ppml /data /shared

WORKDIR /app

# 1. torch from the chosen index (the largest layer; it changes only with TORCH_*).
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# 2. The other runtime dependencies, from pyproject.toml only (no dev tools). torch==X is
#    already satisfied by X+cpu or X+cu128, so pip keeps the build installed above.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write(chr(10).join(deps))" \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 3. The source, installed as a regular (non-editable) package without touching dependencies.
COPY README.md alembic.ini ./
COPY migrations migrations
COPY ppml ppml
COPY api api
COPY worker worker
RUN pip install --no-deps . \
 && rm -rf build ppml.egg-info

USER ppml
ENV PPML_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["ppml", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
