#!/usr/bin/env bash
# The local base image: Debian 12 (bookworm) with its python3.11, made with debootstrap where no image
# registry is reachable. Usage: base.sh TAG. Its tag (set by container-test.sh) is the content hash of
# this file, so the base is rebuilt only when this recipe changes.
set -euo pipefail
tag=$1
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if ! command -v debootstrap >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "base: debootstrap bookworm (minbase) into $root"
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
# The image's Python: Debian's 3.11 (the version CI runs); ca-certificates for HTTPS model downloads.
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv ca-certificates >/dev/null \
           && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin'
echo "base: importing as $tag"
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
