# syntax=docker/dockerfile:1
#
# Container image of redis-entra-proxy: one statically linked binary in an empty (`scratch`)
# image, run as a non-root user. No shell, no libc, no CA bundle: the binary carries its own
# Mozilla roots (webpki-roots) for the TLS connection to Azure Managed Redis.
#
# Three stages, two ways to build the same runtime image:
#
#   build             compiles the binary from source. Needs the rust:1-bookworm image.
#   runtime           (default) the binary from the `build` stage:
#                         docker build -t redis-entra-proxy .
#   runtime-prebuilt  the binary from the build context, target/container/redis-entra-proxy,
#                     for machines that cannot pull a Rust image (or that already built it):
#                         scripts/container-smoke (builds it on the host, then:)
#                         podman build --target runtime-prebuilt -t redis-entra-proxy .
#
# Both runtime stages start from the same `runtime-base`, so they differ only in where the
# binary comes from; user, ports and entry point cannot drift apart. BuildKit and buildah
# (podman) build only the stages the chosen target needs, so `--target runtime-prebuilt` never
# pulls the Rust image, and the default target never reads target/container/. (The legacy
# Docker builder, DOCKER_BUILDKIT=0, builds every stage before the target: use BuildKit.)
#
# Why a static glibc binary and not musl: `-C target-feature=+crt-static` on the
# *-linux-gnu target needs no extra Rust target or C cross-toolchain (the musl target cannot
# be installed everywhere the image is built), and keeps glibc's malloc (musl's is known to
# be slow for multi-threaded programs). The upstream's host name is resolved by the static
# glibc's built-in `files` and `dns` lookups, which read the /etc/hosts and /etc/resolv.conf
# that Docker, podman and Kubernetes mount into every container (checked with podman: a name
# from --add-host, and one answered by a DNS server named in a mounted resolv.conf).

# ---------------------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# --target is given explicitly so that RUSTFLAGS apply only to the proxy and its libraries,
# not to build scripts and proc macros (a proc macro cannot be linked statically).
# The host triple makes the same line work on x86_64 and aarch64 builders.
# strip=debuginfo drops the line tables of the release profile (about 50 MB -> 11 MB), keeps
# symbol names, so a backtrace still names functions.
# The cache mounts keep the registry and target directory between builds; the binary is
# copied out of the cached target directory to /out in the same step.
# The last line refuses a dynamically linked binary (one with NEEDED libraries): it would not
# start in an image without libc. (`ldd` cannot tell: it exits 0 on static binaries too.)
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eu; \
    triple="$(rustc -vV | sed -n 's/^host: //p')"; \
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_STRIP=debuginfo \
        cargo build --release --locked --target "$triple"; \
    install -D -m 0755 "target/$triple/release/redis-entra-proxy" /out/redis-entra-proxy; \
    if readelf -d /out/redis-entra-proxy | grep -q NEEDED; then \
        echo "redis-entra-proxy is not statically linked" >&2; exit 1; \
    fi

# ---------------------------------------------------------------------------------------------
FROM scratch AS runtime-base
LABEL org.opencontainers.image.title="redis-entra-proxy" \
      org.opencontainers.image.description="RESP-aware proxy authenticating Redis clients to Azure Managed Redis with Microsoft Entra ID tokens" \
      org.opencontainers.image.licenses="MIT"
# 6379: clients (--listen). 9090: admin HTTP, /metrics /healthz /readyz /startupz
# (--admin-listen). Both listen on 127.0.0.1 by default, which suits a sidecar sharing the
# pod's network namespace; the admin port must be opened with --admin-listen 0.0.0.0:9090 for
# kubelet probes and scrapers (see config/kubernetes-sidecar.yaml).
EXPOSE 6379 9090
# 65532 is the conventional "nonroot" uid/gid of distroless images. A numeric id, as there
# is no /etc/passwd, and Kubernetes' runAsNonRoot can only check a numeric user.
USER 65532:65532
# The process writes nothing to its filesystem (tokens live in memory), so the root
# filesystem can be read-only; only --unix-socket needs a writable directory (mount one).
ENTRYPOINT ["/redis-entra-proxy"]
# `docker ps` and compose's `service_healthy` read it (Kubernetes ignores it: it has its own
# probes, see config/kubernetes-sidecar.yaml). The image has no curl: the proxy asks its own
# admin endpoint (--admin-listen, from the container's environment).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/redis-entra-proxy", "healthcheck"]
# No CMD: the configuration comes from REDIS_ENTRA_PROXY_* variables or flags, and the
# defaults (--listen 127.0.0.1:6379) are right for a sidecar. Listening on 0.0.0.0 would
# need a local password (--local-password-file) or --allow-unauthenticated-remote.

# ---------------------------------------------------------------------------------------------
# The binary built on the host: scripts/container-smoke shows how
# (RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target <host triple>,
# then copied to target/container/redis-entra-proxy; .dockerignore lets only that file of
# target/ into the build context).
FROM runtime-base AS runtime-prebuilt
COPY target/container/redis-entra-proxy /redis-entra-proxy

# ---------------------------------------------------------------------------------------------
# Last, so that a plain `docker build .` produces it.
FROM runtime-base AS runtime
COPY --from=build /out/redis-entra-proxy /redis-entra-proxy
