# Palimpsest: one image for the API, the workers and the migrations (docker-compose.yml).
#
#   docker build -t palimpsest .                      # torch 2.13.0, CPU build (default)
#   docker build -t palimpsest \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA 12.8 build, for worker-gpu
#
# TORCH_INDEX_URL picks the torch wheel index: .../whl/cpu (default) or .../whl/cu<version>
# for a CUDA build. CUDA wheels bundle their CUDA libraries; the host provides only the
# NVIDIA driver, through the NVIDIA Container Toolkit.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PALIMPSEST_DATA_DIR=/var/lib/palimpsest

WORKDIR /app

# torch first, from its own index, in its own layer: it is most of the image and changes least.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY . .
# torch==2.13.0 is already satisfied above, so this keeps the CPU or CUDA build chosen there.
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app palimpsest \
    && mkdir -p "${PALIMPSEST_DATA_DIR}" \
    && chown palimpsest "${PALIMPSEST_DATA_DIR}"

USER palimpsest
EXPOSE 8000
CMD ["palimpsest", "serve", "--host", "0.0.0.0", "--port", "8000"]
