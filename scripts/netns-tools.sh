# Sourced by scripts/test and scripts/demo. Pods as network namespaces need `ip` (iproute2),
# iptables and `setpriv` (util-linux); as root on Debian, missing ones are installed.
# `netns_tools` returns 0 when all three are there (after installing them if it could).
netns_tools() {
  local missing=()
  command -v iptables >/dev/null 2>&1 || missing+=(iptables)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "network-namespace pods need ${missing[*]} (Debian packages) and root" >&2
    return 1
  fi
  echo "== installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}
