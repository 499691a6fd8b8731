# An address of this node that the other nodes of the job can reach (sourced by common.sh).
#
#   node_addr HOST [ALL_HOSTS...]   run on HOST: print its address for a rendezvous (Ray head, DeepSpeed
#                                   master); fails with a message if none is usable for a multi-node job
#   pick_addr NNODES CANDIDATE...   the pure choice, unit-tested: the first IPv4 candidate that is not
#                                   loopback (127/8), unspecified (0.0.0.0) or link-local (169.254/16);
#                                   with none, loopback only for a one-node job, else fail
#
# Candidates, most specific first: the source address of the route to another node of the job
# (`ip -4 route get`: the interface that really reaches it), this node's NodeAddr in slurm.conf,
# `hostname -I`, `getent ahostsv4 $(hostname)`. Never `hostname -i` alone: stock Debian/Ubuntu map
# the host name to 127.0.1.1 in /etc/hosts, which no other node can reach.

is_ipv4() {
  local IFS=. a b c d
  [[ "$1" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || return 1
  read -r a b c d <<< "$1"
  [ "$a" -le 255 ] && [ "$b" -le 255 ] && [ "$c" -le 255 ] && [ "$d" -le 255 ]
}

pick_addr() {
  local nnodes=$1 cand loopback=""; shift
  for cand in "$@"; do
    is_ipv4 "$cand" || continue
    case "$cand" in
      127.*) loopback=$cand;;
      0.0.0.0|169.254.*) ;;
      *) printf '%s\n' "$cand"; return 0;;
    esac
  done
  if [ "$nnodes" -le 1 ] && [ -n "$loopback" ]; then printf '%s\n' "$loopback"; return 0; fi
  if [ "$nnodes" -le 1 ]; then printf '127.0.0.1\n'; return 0; fi
  echo "netaddr: none of the candidate addresses ($*) is reachable from other nodes (all loopback," \
       "link-local or not IPv4); set CRYSTALFM_MASTER_ADDR to this node's address on the cluster network" >&2
  return 1
}

# The IPv4 address SLURM knows a node by (NodeAddr), or what its name resolves to.
_slurm_node_addr() {
  local addr
  addr=$(scontrol show node "$1" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
  if is_ipv4 "$addr"; then printf '%s\n' "$addr"; return 0; fi
  getent ahostsv4 "${addr:-$1}" 2>/dev/null | awk '{print $1}' | head -n 1
}

node_addr() {
  local host=$1 other="" peer src cands=(); shift
  local nnodes=$#
  [ "$nnodes" -ge 1 ] || nnodes=1
  for peer in "$@"; do [ "$peer" != "$host" ] && { other=$peer; break; }; done
  if [ -n "$other" ] && command -v ip >/dev/null; then
    peer=$(_slurm_node_addr "$other")
    if is_ipv4 "$peer"; then
      src=$(ip -4 route get "$peer" 2>/dev/null | tr ' ' '\n' | sed -n '/^src$/{n;p;}' | head -n 1)
      cands+=("$src")
    fi
  fi
  cands+=("$(_slurm_node_addr "$host")")
  cands+=($(hostname -I 2>/dev/null || true))
  cands+=($(getent ahostsv4 "$(hostname)" 2>/dev/null | awk '{print $1}' | sort -u || true))
  pick_addr "$nnodes" "${cands[@]}"
}
