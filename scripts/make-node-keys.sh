#!/usr/bin/env bash
# SuperNode authentication key pairs, one per node name.
#
# Usage: scripts/make-node-keys.sh OUT_DIR NAME [NAME ...]
# Writes OUT_DIR/NAME (private key, OpenSSH format, no passphrase) and OUT_DIR/NAME.pub
# (public key, OpenSSH format) for each NAME. Flower expects an EC key on a NIST curve
# (P-384 here): the SuperNode gets `--auth-supernode-private-key OUT_DIR/NAME`, and the
# public key is registered with `flwr supernode register OUT_DIR/NAME.pub <connection>`
# against a SuperLink started with `--enable-supernode-auth`.
# Idempotent: an existing pair is kept. Uses ssh-keygen, or Python's `cryptography`
# (a Flower dependency) where ssh-keygen is missing.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR NAME [NAME ...]" >&2
  exit 2
fi
OUT_DIR=$1
shift
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}

make_pair() {  # $1: path of the private key; the public key goes to $1.pub
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "$1"
  else
    "$PYTHON" - "$1" <<'PY'
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path = Path(sys.argv[1])
key = ec.generate_private_key(ec.SECP384R1())
path.write_bytes(
    key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
)
path.chmod(0o600)
Path(f"{path}.pub").write_bytes(
    key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    + b"\n"
)
PY
  fi
}

for name in "$@"; do
  if [[ ! $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
    echo "make-node-keys: node name '$name' must be letters, digits, '.', '_' or '-'" >&2
    exit 2
  fi
  key="$OUT_DIR/$name"
  if [ -s "$key" ] && [ -s "$key.pub" ]; then
    echo "kept     $key, $key.pub"
  else
    rm -f "$key" "$key.pub"
    make_pair "$key"
    echo "made     $key, $key.pub (ECDSA P-384)"
  fi
done
