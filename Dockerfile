# syntax=docker/dockerfile:1
# Sieve images. Two targets, each a build stage and a runtime stage:
#
#   docker build --target cpu  -t sieve:cpu  .    # Debian 12, the CPU backend: runs anywhere
#   docker build --target cuda -t sieve:cuda .    # NVIDIA CUDA base image, the CUDA backend (H100)
#   docker run --rm -p 50051:50051 -p 9090:9090 sieve:cpu    # serves the embedded model at once
#
# A runtime image holds only the daemon (sieved), the CLI (sieve), their shared libraries,
# configs/ and the embedded model, under /opt/sieve, run by the non-root user `sieve`
# (uid 65532). HEALTHCHECK asks the daemon's grpc.health.v1 service through the CLI.
# Flags after the image name replace CMD: e.g. `--config configs/my.yaml --set kv_cache.num_pages=0`.
# deploy/README.md says how this file is checked where no container engine runs
# (tests/deploy/dockerfile_check.py).

ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG CUDA_VERSION=13.0.0
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# CPU: build on Debian 12 with Debian's packages (the build packages of scripts/install-deps.sh)
FROM ${DEBIAN_IMAGE} AS build-cpu
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      build-essential cmake ninja-build pkg-config \
      libabsl-dev libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc \
      prometheus-cpp-dev libyaml-cpp-dev nlohmann-json3-dev libhwy-dev \
      libpcre2-dev libicu-dev libdnnl-dev libcpp-httplib-dev libucx-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . /src
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSIEVE_CUDA=OFF -DSIEVE_BUILD_TESTS=OFF \
 && cmake --build build --target sieved sieve

FROM ${DEBIAN_IMAGE} AS cpu
# The shared libraries of sieved and sieve (tests/deploy/dockerfile_check.py checks that these
# packages, with their dependencies and Debian's required base, provide every one ldd lists).
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libabsl20220623 libgrpc++1.51 libgrpc29 libprotobuf32 libyaml-cpp0.7 \
      libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libcivetweb1 libhwy1 \
      libdnnl2 libgomp1 libicu72 ocl-icd-libopencl1 \
      libc-ares2 libre2-9 libssl3 zlib1g libstdc++6 libcpp-httplib0.11 libucx0 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 sieve \
 && useradd --system --uid 65532 --gid sieve --home-dir /opt/sieve --shell /usr/sbin/nologin sieve
WORKDIR /opt/sieve
COPY --from=build-cpu /src/build/server/sieved /src/build/cli/sieve /opt/sieve/bin/
COPY configs/ /opt/sieve/configs/
COPY models/embedded/ /opt/sieve/models/embedded/
ENV PATH=/opt/sieve/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER 65532:65532
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/opt/sieve/bin/sieve", "health", "--target", "127.0.0.1:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/sieve/bin/sieved"]
CMD ["--config", "configs/default.yaml"]

# ---------------------------------------------------------------------------------------------
# CUDA: build on NVIDIA's CUDA devel image (Ubuntu 24.04: the same library versions as Debian
# 12's), kernels for sm_90a (H100). The runtime stage takes the shared libraries the binaries
# load from the build stage (deploy/docker/collect-libs.sh), not from a second package list;
# the driver's libcuda comes from the NVIDIA container toolkit at run time.
FROM ${CUDA_DEVEL_IMAGE} AS build-cuda
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      build-essential cmake ninja-build pkg-config \
      libabsl-dev libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc \
      prometheus-cpp-dev libyaml-cpp-dev nlohmann-json3-dev libhwy-dev \
      libpcre2-dev libicu-dev libdnnl-dev libcpp-httplib-dev libucx-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . /src
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSIEVE_CUDA=ON -DSIEVE_BUILD_TESTS=OFF \
 && cmake --build build --target sieved sieve \
 && bash deploy/docker/collect-libs.sh /opt/sieve/lib build/server/sieved build/cli/sieve

FROM ${CUDA_RUNTIME_IMAGE} AS cuda
RUN groupadd --system --gid 65532 sieve \
 && useradd --system --uid 65532 --gid sieve --home-dir /opt/sieve --shell /usr/sbin/nologin sieve
WORKDIR /opt/sieve
COPY --from=build-cuda /opt/sieve/lib/ /opt/sieve/lib/
COPY --from=build-cuda /src/build/server/sieved /src/build/cli/sieve /opt/sieve/bin/
COPY configs/ /opt/sieve/configs/
COPY models/embedded/ /opt/sieve/models/embedded/
ENV PATH=/opt/sieve/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/opt/sieve/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
  CMD ["/opt/sieve/bin/sieve", "health", "--target", "127.0.0.1:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/sieve/bin/sieved"]
CMD ["--config", "configs/default.yaml", "--set", "model.backend=cuda"]
