#!/bin/sh
# Lays out the cache-node runtime image's files from a compiled binary:
#   docker/make-rootfs.sh <cache-node binary> <output directory>
# <output>/rootfs is the image's root: the binary, the shared libraries it links (copied from the
# machine that built it, so it runs on that glibc), the default config and the service user's
# passwd/group entries. <output>/cache is the empty cache directory, copied to /var/cache/outpost
# with the service user as owner. No shell, no package manager.
set -eu
binary=$1
image=$2
out=$image/rootfs
here=$(cd "$(dirname "$0")" && pwd)

rm -rf "$out" "$image/cache"
mkdir -p "$out/usr/local/bin" "$out/etc/outpost" "$out/tmp" "$image/cache"
cp "$binary" "$out/usr/local/bin/cache-node"
# Debug info is for the build host; it would triple the image. Backtraces keep symbol names.
if command -v strip >/dev/null 2>&1; then
  strip --strip-debug "$out/usr/local/bin/cache-node"
fi
# ldd prints "libx.so => /path/libx.so (0x...)" for libraries and "/lib64/ld-linux... (0x...)" for
# the loader; copy each, following symlinks, to the same path in the image.
ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
  while read -r library; do
    mkdir -p "$out$(dirname "$library")"
    cp -L "$library" "$out$library"
  done
# The image's default config is the shipped one with container paths and the client port 80. The
# admin listener stays on the container's loopback (the health check runs inside): exposing it is
# the admin's choice (CACHE_NODE__ADMIN__LISTEN, see docker/compose.yaml). An admin mounts their
# own config over it; CACHE_NODE__* variables override either.
sed -e 's|^listen = "0.0.0.0:8080"|listen = "0.0.0.0:80"|' \
    -e 's|^path = "cache-data"|path = "/var/cache/outpost"|' \
    -e 's|^format = "text"|format = "json"|' \
    "$here/../conf/cache-node.toml" > "$out/etc/outpost/cache-node.toml"
for expected in 'listen = "0.0.0.0:80"' 'listen = "127.0.0.1:9090"' 'path = "/var/cache/outpost"' 'format = "json"'; do
  grep -qx "$expected" "$out/etc/outpost/cache-node.toml" || {
    echo "make-rootfs.sh: conf/cache-node.toml changed; cannot set $expected" >&2
    exit 1
  }
done
printf 'root:x:0:0::/:/sbin/nologin\noutpost:x:10001:10001::/var/cache/outpost:/sbin/nologin\n' > "$out/etc/passwd"
printf 'root:x:0:\noutpost:x:10001:\n' > "$out/etc/group"
printf 'hosts: files dns\n' > "$out/etc/nsswitch.conf"
chmod 1777 "$out/tmp"
