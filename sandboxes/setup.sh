#!/usr/bin/env bash
# Installs the host tools posttrain.sandboxes needs (Debian/Ubuntu, run as root).
# Idempotent: does nothing when everything is already present.
#   bubblewrap     - namespaces + read-only /usr + tmpfs workdir   (/usr/bin/bwrap)
#   python3-seccomp- libseccomp bindings used to compile the syscall filter
#   python3        - the interpreter that runs untrusted code inside the sandbox
#   util-linux     - setpriv / prlimit
set -euo pipefail

need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
/usr/bin/python3 -c "import seccomp" >/dev/null 2>&1 || need+=(python3-seccomp)
[ -x /usr/bin/python3 ] || need+=(python3)
{ command -v setpriv && command -v prlimit; } >/dev/null 2>&1 || need+=(util-linux)

if [ "${#need[@]}" -eq 0 ]; then
  echo "sandboxes/setup.sh: all sandbox tools present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "sandboxes/setup.sh: missing ${need[*]}; run as root (or: sudo apt-get install -y ${need[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "sandboxes/setup.sh: installed ${need[*]}"
