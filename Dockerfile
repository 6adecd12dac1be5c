# One image for the operator (kopf) and the node agent (`regmirror agent`).
#   docker build -t regmirror:0.1.0 .
# Build stage: install the package and its dependencies into a virtualenv; the runtime stage copies only that.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/regmirror
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api ./api
COPY agent ./agent
COPY operator ./operator
RUN /opt/regmirror/bin/pip install . \
 && /opt/regmirror/bin/python -c "import regmirror_api, regmirror_agent, regmirror_operator, kopf, kubernetes"

FROM python:3.11-slim
# util-linux (nsenter, used by the agent to restart the host's runtime in PID 1's namespaces) is part of the
# Debian base already; nothing else is installed.
COPY --from=build /opt/regmirror /opt/regmirror
ENV PATH=/opt/regmirror/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Non-root by default; the agent DaemonSet runs as root (runAsUser: 0) because it writes host files.
RUN groupadd --gid 10001 regmirror \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin regmirror
USER 10001
CMD ["regmirror", "--help"]
