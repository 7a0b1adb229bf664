# The slim Purifier sidecar image: `purifier serve`, configured through PURIFIER_* environment
# variables (every one listed in docs/configuration.md). Build from the repository root:
#   docker build -t purifier-sidecar .
# It installs the serving dependencies only ('.[cpu]': grpcio, numpy, onnxruntime, prometheus-client,
# threadpoolctl, uvicorn, httptools, orjson): no torch, scikit-learn, matplotlib or tritonclient. It serves `none`, MemGuard in
# fast mode and PURIFIER; fitting, auditing and MemGuard's faithful mode need the full install
# ('.[cpu,full]'). `make slim-venv` builds the same install into .venv-slim (its size: `make
# slim-size`; start-up and memory: benchmarks/bench_startup.py).
FROM python:3.11-slim

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
    PURIFIER_HTTP_PORT=9000 \
    PURIFIER_PORT=9001 \
    PURIFIER_METRICS_HOST=0.0.0.0 \
    PURIFIER_METRICS_PORT=9002
EXPOSE 9000 9001 9002
STOPSIGNAL SIGTERM
ENTRYPOINT ["purifier", "serve"]
