#!/bin/sh
# Entrypoint of the fedinstruct images: one image, every role.
#   superlink ARGS...        flower-superlink ARGS, its ServerApp processes forked from a warm
#                            app server (fedinstruct.deploy.warm; FEDINSTRUCT_WARM=0: off)
#   supernode ARGS...        flower-supernode ARGS, its ClientApp processes likewise
#   serverapp|superexec ...  flower-superexec ARGS (ServerApp/ClientApp runner for
#                            `--isolation process` deployments)
#   register ADDRESS CA PUB...  register SuperNode public keys with the SuperLink at ADDRESS
#                            (TLS, CA = root certificate); keys already registered are fine
#   make-certs / make-node-keys ARGS...   the scripts/ of the same name
#   flwr ARGS... | fedinstruct ARGS... | any other command: run as given
set -eu

register() {
  address=${1:?register: SuperLink address (host:port) missing}
  ca=${2:?register: root certificate path missing}
  shift 2
  [ $# -gt 0 ] || { echo "register: no public keys given" >&2; exit 2; }
  FLWR_HOME=$(mktemp -d)
  export FLWR_HOME
  trap 'rm -rf "$FLWR_HOME"' EXIT
  printf '[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\naddress = "%s"\nroot-certificates = "%s"\n' \
    "$address" "$ca" >"$FLWR_HOME/config.toml"
  for key in "$@"; do
    tries=0
    while :; do
      if out=$(flwr supernode register "$key" deployment 2>&1); then
        echo "$out" | tail -n 1
        break
      fi
      case $out in
        *"already in use"*) echo "already registered: $key"; break ;;
      esac
      tries=$((tries + 1))
      if [ "$tries" -ge "${REGISTER_TRIES:-60}" ]; then
        echo "register: giving up on $key after $tries tries:" >&2
        echo "$out" >&2
        exit 1
      fi
      sleep "${REGISTER_WAIT_S:-2}"  # the SuperLink may still be starting
    done
  done
}

warm_server() {  # $1: the Flower command it serves (flwr-clientapp, flwr-serverapp), $2: the app
  # Until the server is up (or if it fails) the launchers run Flower's command cold.
  # A fresh folder of its own, mode 700 (the server refuses a folder others can enter; short:
  # Unix socket paths are limited); it also holds the server's prewarm hints (node.hint.json).
  dir=$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/fedinstruct-warm.XXXXXX")
  sock=$dir/node.sock
  shims=$dir/bin
  python -m fedinstruct.deploy.warm "$1" --socket "$sock" --shims "$shims" \
    --app "$2" --exit-with-parent &
  PATH=$shims:$PATH
  FEDINSTRUCT_WARM_SOCKET=$sock
  export PATH FEDINSTRUCT_WARM_SOCKET
}

serves() {  # false for --help/--version: nothing to serve
  case " $* " in
    *" --help "* | *" -h "* | *" --version "* | *" -V "*) return 1 ;;
  esac
  [ "${FEDINSTRUCT_WARM:-1}" != 0 ]
}

role=${1:-}
[ $# -gt 0 ] && shift
case $role in
  superlink)
    if serves "$@"; then warm_server flwr-serverapp fedinstruct.server_app; fi
    exec flower-superlink "$@" ;;
  supernode)
    if serves "$@"; then warm_server flwr-clientapp fedinstruct.client_app; fi
    exec flower-supernode "$@" ;;
  serverapp | superexec) exec flower-superexec "$@" ;;
  register) register "$@" ;;
  make-certs) exec bash "${FEDINSTRUCT_SCRIPTS:-/app/scripts}/make-certs.sh" "$@" ;;
  make-node-keys) exec bash "${FEDINSTRUCT_SCRIPTS:-/app/scripts}/make-node-keys.sh" "$@" ;;
  "") echo "usage: superlink|supernode|serverapp|register|make-certs|make-node-keys|CMD ..." >&2
      exit 2 ;;
  *) exec "$role" "$@" ;;
esac
