# One image for every Baton service; compose.yaml picks the command.
FROM python:3.11-slim

# TORCH_SPEC: the default pulls PyPI's CUDA build (GPU workers); for CPU-only
# images build with --build-arg TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
ARG TORCH_SPEC=torch
RUN pip install --no-cache-dir ${TORCH_SPEC}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine engine
COPY kernels kernels
COPY kvtransfer kvtransfer
COPY protos protos
COPY services services
# UCX_EXTRA: the ucxx build for the image's CUDA (ucx for CUDA 12, ucx-cu13 for CUDA 13).
ARG UCX_EXTRA=ucx
RUN pip install --no-cache-dir ".[${UCX_EXTRA}]"

ENV PYTHONUNBUFFERED=1
EXPOSE 8000 50051 50061 50062 9100 9101
CMD ["python", "-P", "-m", "baton.services.gateway", "--help"]
