# The GPU image: darkhorse on a CUDA base, for Docker or podman hosts with the NVIDIA container toolkit.
#   docker build -t darkhorse-gpu .            (TORCH_SPEC: any torch build, e.g. --build-arg TORCH_SPEC=torch==2.14.1)
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v $PWD/runs:/work/runs darkhorse-gpu \
#       serve --checkpoint runs/NAME/final --host 0.0.0.0 --device cuda
# It needs registries (Docker Hub, ghcr.io) that our CI machine cannot reach, so CI builds and tests the CPU
# image (make image, container/) instead; docs/benchmarks.md checks these steps there with local stand-ins.
# The CUDA libraries come with torch's wheels; the base image brings the CUDA user-space setup the
# toolkit expects. constraints.txt pins Python 3.11, which uv fetches (Ubuntu 24.04 ships 3.12).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# One place for the torch build; the default is the Makefile's TORCH_SPEC (tests/test_container.py checks).
ARG TORCH_SPEC=torch==2.13.0
ARG PYTHON_VERSION=3.11

COPY --from=ghcr.io/astral-sh/uv:0.12.1 /uv /usr/local/bin/uv
ENV VIRTUAL_ENV=/opt/darkhorse PATH=/opt/darkhorse/bin:$PATH PYTHONUNBUFFERED=1 UV_PYTHON_INSTALL_DIR=/opt/python
RUN uv venv --python "$PYTHON_VERSION" "$VIRTUAL_ENV"

WORKDIR /src
# Dependencies first (a layer that survives source edits), then darkhorse itself.
COPY pyproject.toml constraints.txt ./
RUN uv pip install --no-cache "$TORCH_SPEC" \
    && uv pip install --no-cache -c constraints.txt -r pyproject.toml --extra serve
COPY README.md ./
COPY src ./src
RUN uv pip install --no-cache --no-deps ".[serve]" && rm -rf /src

WORKDIR /work
EXPOSE 8000
ENTRYPOINT ["darkhorse"]
CMD ["--help"]
