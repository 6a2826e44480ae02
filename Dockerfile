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
RUN pip install --no-cache-dir .

ENV PYTHONUNBUFFERED=1
EXPOSE 8000 50051 50061
CMD ["python", "-P", "-m", "baton.services.gateway", "--help"]
