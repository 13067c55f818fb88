# One image for the API, the workers and the migration job.
# CPU by default; for NVIDIA GPUs build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY ppml ppml
COPY api api
COPY worker worker
COPY migrations migrations
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==2.13.0 \
 && pip install --no-cache-dir -e .
ENV PPML_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
CMD ["ppml", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
