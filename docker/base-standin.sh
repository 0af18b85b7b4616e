#!/usr/bin/env bash
# A stand-in for the image's base, rayproject/ray:<RAY_VERSION>-py311-<VARIANT>, made from the
# Debian mirror for machines that reach no container registry (CI, air-gapped build hosts).
# It has what docker/Dockerfile and Ray's cluster tooling rely on in the real base: user `ray`
# (uid 1000, group users = gid 100), home /home/ray, Python 3.11 as `python` with pip at
# /home/ray/anaconda3/bin (a venv where the real base has conda), on PATH, owned by `ray`.
# It has no CUDA libraries and no Ray: the Dockerfile installs Ray and torch from uv.lock.
# The host's extra CA certificates come along (pip, uv and Python told to use the system store), so
# that a build behind a TLS proxy trusts what this machine trusts; nothing else of the host's
# configuration does (a pip.conf may hold an index URL with a token).
#
#   docker/base-standin.sh [TAG]        (root; needs debootstrap and docker)
#   docker build -f docker/Dockerfile --build-arg BASE_IMAGE=TAG -t invariance:local .
set -euo pipefail
tag="${1:-invariance/base-standin:py311}"
suite="${DEBIAN_SUITE:-bookworm}"  # bookworm's python3.11
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
docker_cli=(docker)
command -v debootstrap >/dev/null || { echo "base-standin: needs debootstrap (apt-get install -y debootstrap)" >&2; exit 1; }
root="$(mktemp -d /tmp/invariance-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
chmod 755 "$root"  # it becomes the image's /: mktemp made it 0700
echo "base-standin: debootstrap $suite from $mirror into $root" >&2
debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,ca-certificates,procps \
    "$suite" "$root" "$mirror" >"$root.log" 2>&1 || { grep -v "^I:" "$root.log" | tail -20 >&2; grep -B3 -i error "$root/debootstrap/debootstrap.log" | tail -20 >&2; exit 1; }
rm -f "$root.log"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
fi
chroot "$root" useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray
chroot "$root" su ray -c "python3.11 -m venv /home/ray/anaconda3"
chroot "$root" /home/ray/anaconda3/bin/python --version >&2
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "${docker_cli[@]}" import \
    --change 'USER ray' --change 'WORKDIR /home/ray' \
    --change 'ENV PATH=/home/ray/anaconda3/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$tag" >/dev/null
echo "base-standin: $tag" >&2
