#!/usr/bin/env bash
# Copies the shared libraries that the given binaries load (as ldd resolves them) into DEST,
# leaving out those every runtime image has (the C library's own: libc, libm, libdl,
# libpthread, librt, the dynamic loader, libgcc_s, libstdc++ stay with the base image's glibc
# and GCC runtime, which must match) and the NVIDIA driver's (libcuda, libnvidia-*: the
# container toolkit mounts the host's). Fails if ldd cannot resolve a library.
#
#   deploy/docker/collect-libs.sh DEST BINARY...
set -euo pipefail
dest=$1
shift
mkdir -p "$dest"
keep_out='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|libcuda|libnvidia-)[.-]'
for bin in "$@"; do
  if ldd "$bin" | grep -q 'not found'; then
    echo "collect-libs: $bin: unresolved libraries:" >&2
    ldd "$bin" | grep 'not found' >&2
    exit 1
  fi
  ldd "$bin" | awk '/=> \//{print $1, $3}' | while read -r name path; do
    [[ $name =~ $keep_out ]] && continue
    cp -L "$path" "$dest/$name"
  done
done
ls "$dest"
