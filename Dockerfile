# The Purifier sidecar image: `purifier serve`, configured through PURIFIER_* environment
# variables (see README "Configuration"). Build from the repository root:
#   docker build -t purifier-sidecar .
# torch is pinned to 2.13.0 by constraints.txt; on a registry whose default torch wheel carries
# CUDA, pass a CPU-only wheel index with --build-arg PIP_EXTRA_INDEX_URL=... to keep the image small.
FROM python:3.11-slim

ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

WORKDIR /opt/purifier
COPY pyproject.toml constraints.txt README.md ./
COPY purifier ./purifier
COPY server ./server
COPY proto ./proto
RUN pip install -c constraints.txt '.[cpu]' && rm -rf /root/.cache

# Unprivileged; defense artifacts and the PRF secret are mounted read-only.
USER 65532:65532
ENV PURIFIER_HOST=0.0.0.0 \
    PURIFIER_PORT=9001 \
    PURIFIER_METRICS_HOST=0.0.0.0 \
    PURIFIER_METRICS_PORT=9002
EXPOSE 9001 9002
STOPSIGNAL SIGTERM
ENTRYPOINT ["purifier", "serve"]
