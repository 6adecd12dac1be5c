# One image for the operator (`kopf run -m regmirror_operator.main`) and the node agent (`regmirror agent`).
#
# Build and push it to a registry your nodes can pull from, then point the manifests at it:
#   docker build -t REGISTRY/regmirror:TAG . && docker push REGISTRY/regmirror:TAG
#   cd manifests && kustomize edit set image regmirror=REGISTRY/regmirror:TAG
# (or, without kustomize, edit the `images:` entry of manifests/kustomization.yaml and `kubectl apply -k manifests`).
#
# BASE is any Debian-based image with `python3` (>= 3.11) and its `venv` module, and util-linux (`nsenter`) and a
# POSIX `sh`, which Debian's base has: the default is the official Python image; the tests build on a bookworm
# root filesystem made from Debian's own python3 + python3-venv (tests/cluster/image.py). Only `python3` is named
# here, never `python`, because Debian's interpreter is /usr/bin/python3 alone.
ARG BASE=python:3.11-slim

# Build stage: install the package and its dependencies into a virtualenv; the runtime stage copies only that.
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/regmirror
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api ./api
COPY agent ./agent
COPY operator ./operator
# pip and setuptools only install; nothing imports them at run time, so they stay behind in this stage.
RUN /opt/regmirror/bin/python3 -m pip install . \
 && /opt/regmirror/bin/python3 -m pip uninstall --yes pip setuptools \
 && /opt/regmirror/bin/python3 -c "import regmirror_api, regmirror_agent, regmirror_operator.main, kopf, kubernetes" \
 && /opt/regmirror/bin/regmirror --help >/dev/null \
 && /opt/regmirror/bin/kopf --help >/dev/null

FROM ${BASE}
# util-linux (nsenter, used by the agent to restart the host's runtime in PID 1's namespaces) and sh are part of
# the Debian base already; nothing else is installed.
COPY --from=build /opt/regmirror /opt/regmirror
ENV PATH=/opt/regmirror/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Non-root by default; the agent DaemonSet runs as root (runAsUser: 0) because it writes host files.
RUN groupadd --gid 10001 regmirror \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin regmirror
USER 10001
CMD ["regmirror", "--help"]
