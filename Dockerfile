# psgrid as a container image: every role (server, worker, serve) runs from it.
#
#   docker build -t psgrid:0.1.0 .                      # CPU torch (the default)
#   docker build -t psgrid:0.1.0-cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .   # CUDA torch, for GPU workers
#
# TORCH_INDEX_URL is the pip index torch comes from; a CUDA wheel carries its own CUDA
# libraries and needs only the NVIDIA driver on the node. docs/kubernetes.md runs it.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

COPY . /src
RUN pip install --index-url "$TORCH_INDEX_URL" torch \
 && pip install /src \
 && rm -rf /src \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin psgrid

# The manifests run as this user with a read-only root filesystem; /tmp is a volume there.
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["psgrid"]
CMD ["--help"]
