#!/usr/bin/env bash
# Development CA and SuperLink server certificate for TLS between SuperLink, SuperNodes and `flwr`.
#
# Usage: scripts/make-certs.sh [OUT_DIR] [NAME_OR_IP ...]
#   OUT_DIR      folder for the files (default: certs)
#   NAME_OR_IP   names/addresses the SuperLink is reached at; they become the certificate's
#                subjectAltName (default: localhost 127.0.0.1). Add every name clients dial,
#                e.g. the Compose service name `superlink`.
# Writes ca.key, ca.crt (give ca.crt to SuperNodes and to `flwr` as root-certificates),
# server.key and server.pem (give them and ca.crt to the SuperLink).
# Idempotent: keeps an existing CA, and keeps the server certificate while it is signed by
# that CA and covers exactly the requested names; otherwise it re-issues the server certificate.
# For development only: the CA key sits unencrypted next to the certificates.
set -euo pipefail

OUT_DIR=${1:-certs}
shift || true
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(localhost 127.0.0.1)
DAYS=${CERT_DAYS:-825}

command -v openssl >/dev/null || { echo "make-certs: openssl not found on PATH" >&2; exit 1; }
mkdir -p "$OUT_DIR"
cd "$OUT_DIR"

san=""
for name in "${NAMES[@]}"; do
  if [[ $name =~ ^[0-9]+(\.[0-9]+){3}$ || $name == *:* ]]; then
    entry="IP:$name"
  elif [[ $name =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
    entry="DNS:$name"
  else
    echo "make-certs: '$name' is neither a host name nor an IP address" >&2
    exit 2
  fi
  san="${san:+$san,}$entry"
done

if [ -s ca.key ] && [ -s ca.crt ]; then
  echo "kept     $PWD/ca.crt (existing development CA)"
else
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days "$DAYS" -out ca.crt \
    -subj "/CN=fedinstruct development CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
  rm -f server.pem  # a new CA invalidates the old server certificate
  echo "made     $PWD/ca.key, $PWD/ca.crt (development CA, $DAYS days)"
fi

# The SAN list as openssl prints it, sorted, to compare with the requested one.
normalized_san() {
  tr ',' '\n' | sed -e 's/^ *//' -e 's/IP Address:/IP:/' | sort | paste -sd, -
}
wanted=$(echo "$san" | normalized_san)
current=""
if [ -s server.pem ] && [ -s server.key ] \
  && openssl verify -CAfile ca.crt server.pem >/dev/null 2>&1; then
  current=$(openssl x509 -in server.pem -noout -ext subjectAltName 2>/dev/null \
    | tail -n +2 | normalized_san)
fi

if [ -n "$current" ] && [ "$current" = "$wanted" ]; then
  echo "kept     $PWD/server.pem (SAN $current)"
else
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key
  openssl req -new -key server.key -out server.csr -subj "/CN=${NAMES[0]}"
  ext=$(mktemp)
  trap 'rm -f "$ext"' EXIT
  printf '%s\n' \
    "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=$san" >"$ext"
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.pem -days "$DAYS" -sha256 -extfile "$ext" 2>/dev/null
  rm -f server.csr
  echo "made     $PWD/server.key, $PWD/server.pem (SAN $wanted)"
fi
chmod 600 ca.key server.key
chmod 644 ca.crt server.pem
