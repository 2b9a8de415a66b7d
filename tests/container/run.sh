#!/usr/bin/env bash
# The container check: build the project's Dockerfile as it is and run it, and docker-compose.yml in every
# profile, with a real container engine, then assert what a Docker user relies on (tests/container/check.py).
#
#   sudo tests/container/run.sh          # from the project root; `make container-check` runs it
#
# The engine is Debian's podman 4.3 behind its Docker-compatible socket, driven by Debian's docker-compose 1.29;
# base images are made from Debian packages (no Docker Hub), the CPU torch wheel is served on 127.0.0.1 as the
# build's package index. All of that is test infrastructure: the Dockerfile and docker-compose.yml are used as
# they are. Work files go to $CONTAINER_WORK (default: a new temporary folder); base images are kept in podman's
# storage and reused. Needs root and the ports 8000 and 8080 free. About 6 minutes cold.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || exec sudo --preserve-env=CONTAINER_WORK "$0" "$@"  # a rootful engine
cd "$(dirname "$0")/../.."
PROJECT=$PWD
HERE=$PROJECT/tests/container
WORK=${CONTAINER_WORK:-$(mktemp -d)}
mkdir -p "$WORK/logs"
echo "container check: work folder $WORK"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
SECONDS=0

# --- the engine ---
missing=()
for cmd in podman buildah mmdebstrap runc docker-compose slirp4netns fuse-overlayfs newuidmap curl; do
  command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages for: ${missing[*]}"
  apt-get update -qq
  # with recommends: netavark and aardvark-dns, which let containers find each other by service name
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc mmdebstrap docker-compose \
    slirp4netns fuse-overlayfs uidmap curl >/dev/null
fi
export CONTAINERS_CONF=$WORK/containers.conf
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
# These VMs cap RLIMIT_NOFILE at 20000; podman's default ulimits are above it and every container fails.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
# crun refuses these VMs' hybrid cgroup layout; runc accepts it. No systemd: cgroupfs, events to a file.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
podman info >"$WORK/logs/podman-info.log"

# --- base images from Debian packages, tagged with the names the project's files use ---
if ! podman image exists localhost/charrnn-debian:bookworm; then
  # without manuals, docs and translations, as Debian's own slim images: the image size measured here then
  # comes close to what the official base gives
  mmdebstrap --quiet --variant=minbase --include=ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' bookworm "$WORK/bookworm.tar" /etc/apt/sources.list.d/*.sources
  podman import -q --change 'ENV LANG=C.UTF-8' "$WORK/bookworm.tar" localhost/charrnn-debian:bookworm >/dev/null
fi
# pip inside an image reaches the package registry through whatever TLS interception this host trusts:
# hand the image the CA certificates the host trusts beyond Debian's own.
rm -rf "$WORK/images" && cp -r "$HERE/images" "$WORK/images"
python3 - "$WORK/images/python/extra-ca.crt" <<'EOF'
import glob, re, sys
pem = lambda text: re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
debian = {c for f in glob.glob("/usr/share/ca-certificates/**/*.crt", recursive=True) for c in pem(open(f).read())}
extra = [c for c in pem(open("/etc/ssl/certs/ca-certificates.crt").read()) if c not in debian]
open(sys.argv[1], "w").write("\n".join(extra) + "\n")
EOF
for image in python:3.11-slim redis:7-alpine nginx:1.27-alpine; do
  if ! podman image exists "docker.io/library/$image"; then
    podman build -q --format docker --network host --pull=never -t "docker.io/library/$image" \
      "$WORK/images/${image%%:*}" >"$WORK/logs/base-${image%%:*}.log"
  fi
done
echo "base images ready after ${SECONDS} s"

# --- the CPU torch wheel and what it needs, as a PEP 503 index on 127.0.0.1 ---
mkdir -p "$WORK/wheels" "$WORK/index/simple"
pip download -q --only-binary=:all: -d "$WORK/wheels" "torch==2.13.0+cpu" 2>"$WORK/logs/pip-download.log" \
  || pip download -q --only-binary=:all: -d "$WORK/wheels" "torch==2.13.0" 2>>"$WORK/logs/pip-download.log"
for wheel in "$WORK"/wheels/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
  mkdir -p "$WORK/index/simple/$name" && ln -f "$wheel" "$WORK/index/simple/$name/"
done
INDEX_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$INDEX_PORT" --bind 127.0.0.1 --directory "$WORK/index" >"$WORK/logs/index.log" 2>&1 &
PIDS+=($!)

# --- the project's image, from a clean copy of the tracked files (a fresh checkout: no runs/) ---
rm -rf "$WORK/src" && mkdir "$WORK/src"
git ls-files -z | xargs -0 cp --parents -t "$WORK/src"
started=$SECONDS
podman build --format docker --network host --pull=never -t charrnn:latest \
  --build-arg "TORCH_INDEX_URL=http://127.0.0.1:$INDEX_PORT/simple" "$WORK/src" >"$WORK/logs/build.log" 2>&1 \
  || { tail -30 "$WORK/logs/build.log"; exit 1; }
echo "$((SECONDS - started))" >"$WORK/build-seconds"
echo "image built in $((SECONDS - started)) s: $(podman image inspect charrnn:latest --format '{{.Size}}') bytes"

# --- the Docker-compatible socket for docker-compose, and healthchecks (podman runs them from systemd
# timers, and these machines have no systemd: a loop stands in, so compose's service_healthy advances) ---
export DOCKER_HOST=unix://$WORK/podman.sock
podman system service --time=0 "$DOCKER_HOST" >"$WORK/logs/podman-service.log" 2>&1 &
PIDS+=($!)
(
  set +e  # an unhealthy container must not end the loop
  while :; do
    for id in $(podman ps -q); do
      [ -n "$(podman inspect -f '{{if .Config.Healthcheck}}yes{{end}}' "$id")" ] && podman healthcheck run "$id"
    done
    sleep 2
  done
) >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 1 50); do [ -S "$WORK/podman.sock" ] && break; sleep 0.1; done

"$PROJECT/.venv/bin/python" "$HERE/check.py" --work "$WORK" --project "$WORK/src"  # httpx from `make test`
echo "container check passed in ${SECONDS} s"
