#!/bin/sh
# Send every outbound TCP connection of the pod to the sidecar's outbound listener, as
# istio-init does. Runs once, in an init container with NET_ADMIN and NET_RAW, before the
# workload starts; the rules live in the pod's network namespace and die with it.
#
#   OUTBOUND_PORT   the sidecar's --outbound-port                    (default 15001)
#   PROXY_UID       the UID Envoy runs as: its own traffic goes out  (default 101)
#   EXCLUDE_CIDRS   space-separated destinations never redirected    (default: none)
#   EXCLUDE_PORTS   space-separated destination ports never redirected (default: none)
set -eu
OUTBOUND_PORT="${OUTBOUND_PORT:-15001}"
PROXY_UID="${PROXY_UID:-101}"

iptables -t nat -N MODELGUARD_OUTPUT
iptables -t nat -N MODELGUARD_REDIRECT
# REDIRECT rewrites to 127.0.0.1:<port> for traffic the pod itself starts: the outbound
# listener binds loopback only, so no other pod can borrow this workload's allowances.
iptables -t nat -A MODELGUARD_REDIRECT -p tcp -j REDIRECT --to-ports "$OUTBOUND_PORT"
# The sidecar's own connections (to the control plane, to allowed destinations) go out as is.
iptables -t nat -A MODELGUARD_OUTPUT -m owner --uid-owner "$PROXY_UID" -j RETURN
# Loopback stays local: the workload talking to itself, or to its sidecar's ports.
iptables -t nat -A MODELGUARD_OUTPUT -d 127.0.0.1/32 -j RETURN
for cidr in ${EXCLUDE_CIDRS:-}; do
  iptables -t nat -A MODELGUARD_OUTPUT -d "$cidr" -j RETURN
done
for port in ${EXCLUDE_PORTS:-}; do
  iptables -t nat -A MODELGUARD_OUTPUT -p tcp --dport "$port" -j RETURN
done
iptables -t nat -A MODELGUARD_OUTPUT -j MODELGUARD_REDIRECT
iptables -t nat -A OUTPUT -p tcp -j MODELGUARD_OUTPUT
iptables -t nat -S
