# syntax=docker/dockerfile:1
#
# One file, three images:
#
#   docker build --target proxy   -t pillion/proxy:dev   .   # the sidecar, pillion-proxy
#   docker build --target init    -t pillion/init:dev    .   # the init container, pillion-iptables-init
#   docker build --target control -t pillion/control:dev .   # the control plane, pillion-control
#
# Without --target the last stage, the proxy, is built.
#
# Needs BuildKit (the default builder since Docker 23): the compile steps keep cargo's target
# directory in a cache mount, so a rebuild after a source change recompiles only what changed.
#
# Base images. Every stage is Debian 12 (bookworm) on purpose: the binaries link glibc
# dynamically, so the build stage's glibc must not be newer than the runtime's. Change all three
# together. For a release build, pin each by digest, e.g.
#   --build-arg DISTROLESS_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:<digest>
ARG RUST_IMAGE=rust:1.95.0-bookworm
ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG DISTROLESS_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------------------------
# manifests: what Cargo reads to resolve the workspace, and nothing else: every Cargo.toml, the
# lock file, and every .rs file emptied (Cargo wants each target's file to exist, not its code).
# The result changes only when a manifest does or a source file is added or removed, so the
# download below is reused across ordinary code changes, and a new workspace member or target
# needs no change here.
FROM ${RUST_IMAGE} AS manifests
WORKDIR /src
COPY . .
RUN find . -type f ! -name Cargo.toml ! -name Cargo.lock ! -name '*.rs' -delete \
    && find . -type f -name '*.rs' -exec truncate -s 0 {} + \
    && find . -type d -empty -delete

# ---------------------------------------------------------------------------------------------
# source: the workspace with every dependency downloaded, then the real code on top.
# `--target` (the build platform) skips crates that only other platforms use.
FROM ${RUST_IMAGE} AS source
WORKDIR /src
COPY --from=manifests /src ./
RUN cargo fetch --locked --target "$(rustc --print host-tuple)"
COPY . .

# ---------------------------------------------------------------------------------------------
# One build stage per binary, so `--target proxy` never compiles the control plane.
# `--offline`: everything was fetched above; the compile step needs no network.
FROM source AS build-proxy
RUN --mount=type=cache,target=/src/target,id=pillion-target \
    cargo build --release --locked --offline --bin pillion-proxy \
    && install -D -m 0755 target/release/pillion-proxy /out/pillion-proxy

FROM source AS build-init
RUN --mount=type=cache,target=/src/target,id=pillion-target \
    cargo build --release --locked --offline --bin pillion-iptables-init \
    && install -D -m 0755 target/release/pillion-iptables-init /out/pillion-iptables-init

FROM source AS build-control
RUN --mount=type=cache,target=/src/target,id=pillion-target \
    cargo build --release --locked --offline --bin pillion-control \
    && install -D -m 0755 target/release/pillion-control /out/pillion-control

# ---------------------------------------------------------------------------------------------
# control: the control-plane API server (gRPC).
#
# Same distroless base as the proxy (below), as distroless's unprivileged "nonroot" user. TLS is
# rustls over aws-lc-rs, compiled into the binary: no OpenSSL at run time. `serve` is the
# default command; the other subcommands (`ca init`, ...) run from the same image.
FROM ${DISTROLESS_IMAGE} AS control
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pillion-control" \
      org.opencontainers.image.description="Pillion's control-plane API: workload certificates, discovery, route and authorization policy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/pillion-mesh/pillion" \
      org.opencontainers.image.url="https://github.com/pillion-mesh/pillion" \
      org.opencontainers.image.documentation="https://github.com/pillion-mesh/pillion/blob/main/docs/kubernetes.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Pillion"
COPY --from=build-control /out/pillion-control /usr/local/bin/pillion-control
USER 65532:65532
EXPOSE 8090
ENTRYPOINT ["/usr/local/bin/pillion-control"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# init: installs the redirect rules, then exits.
#
# pillion-iptables-init runs {ip,ip6}tables-{legacy,nft}-{save,restore} and nothing else; Debian's
# iptables package ships all eight (backend choice is made at run time, so both backends must
# be present). nftables, which it only recommends, is not needed. The binary itself links libc
# and libgcc_s, both in the base image.
#
# Runs as root: changing the pod's nat table needs NET_ADMIN and NET_RAW, which the pod spec
# grants to this container alone, with every other capability dropped.
FROM ${DEBIAN_IMAGE} AS init
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pillion-iptables-init" \
      org.opencontainers.image.description="Installs Pillion's traffic-redirect rules in a pod's network namespace" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/pillion-mesh/pillion" \
      org.opencontainers.image.url="https://github.com/pillion-mesh/pillion" \
      org.opencontainers.image.documentation="https://github.com/pillion-mesh/pillion/blob/main/docs/architecture.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Pillion"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-init /out/pillion-iptables-init /usr/local/bin/pillion-iptables-init
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/usr/local/bin/pillion-iptables-init"]

# ---------------------------------------------------------------------------------------------
# proxy: the sidecar.
#
# Distroless "cc" holds exactly what the binary links (ldd: libc, libm, libgcc_s) plus CA
# certificates; no shell, no package manager. UID/GID 2102 is the identity that
# pillion-iptables-init exempts from redirection (--proxy-uid): run the proxy as anything else
# and its own upstream connections loop back into it. The manifests set the same IDs.
FROM ${DISTROLESS_IMAGE} AS proxy
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pillion-proxy" \
      org.opencontainers.image.description="Pillion's sidecar data plane" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/pillion-mesh/pillion" \
      org.opencontainers.image.url="https://github.com/pillion-mesh/pillion" \
      org.opencontainers.image.documentation="https://github.com/pillion-mesh/pillion/blob/main/docs/kubernetes.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Pillion"
COPY --from=build-proxy /out/pillion-proxy /usr/local/bin/pillion-proxy
USER 2102:2102
# inbound, outbound, admin (probes and metrics)
EXPOSE 4143 4140 4191
ENTRYPOINT ["/usr/local/bin/pillion-proxy"]
