#!/usr/bin/env bash
# `make test-deb`: builds both packages, lints them, and installs, upgrades,
# removes and purges them on this machine (root), checking each step. Prints
# the footprint (package and binary sizes, idle RSS) at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
fail=0
pass=0
check() { # description command...
  local what=$1; shift
  if "$@" >/dev/null 2>&1; then pass=$((pass + 1)); else echo "FAIL: $what" >&2; fail=$((fail + 1)); fi
}
no_crash() { ! grep -qi 'fatal error\|stack dump\|backtrace' <<<"$1"; }
# Starts the installed agent as its service user on its data; sets $agent and $port.
start_agent() {
  : >"$work/agent.log"
  runuser -u scim-edge -- scim-edge serve --data-dir /var/lib/scim-edge --listen 127.0.0.1:0 --token t --admin-listen none \
    >"$work/agent.log" 2>&1 &
  agent=$!
  for _ in $(seq 1 100); do grep -q listening "$work/agent.log" && break; sleep 0.1; done
  port=$(grep -o '127.0.0.1:[0-9]*' "$work/agent.log" | head -1 | cut -d: -f2)
}
[ "$(id -u)" -eq 0 ] || { echo "test-deb: needs root (dpkg -i)" >&2; exit 1; }
version=$(tr -d ' \n' < VERSION)
arch=$(dpkg --print-architecture)
bash scripts/deb.sh >/dev/null || { echo "test-deb: the build failed" >&2; exit 1; }
edge=dist/scim-edge_${version}_${arch}.deb broker=dist/scim-broker_${version}_${arch}.deb
work=$(mktemp -d)
cleanup() { dpkg -P scim-edge scim-broker >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
dpkg -P scim-edge scim-broker >/dev/null 2>&1 || true

check "lintian reports no errors or warnings" lintian --fail-on error,warning "$edge" "$broker"
check ".deb of the agent is at most 8 MB" test "$(stat -c %s "$edge")" -le 8000000

check "dpkg -i installs both" dpkg -i "$edge" "$broker"
check "scim-edge --version is VERSION" test "$(scim-edge --version)" = "$version"
check "scim-broker --version is VERSION" test "$(scim-broker --version)" = "$version"
for pkg in scim-edge scim-broker; do
  conf=/etc/$pkg/$([ $pkg = scim-edge ] && echo agent.yaml || echo broker.yaml)
  check "$pkg: service user exists, no login" test "$(getent passwd $pkg | cut -d: -f7)" = /usr/sbin/nologin
  check "$pkg: data dir is $pkg:$pkg 0750" test "$(stat -c '%U:%G %a' /var/lib/$pkg)" = "$pkg:$pkg 750"
  check "$pkg: config is root:$pkg 0640" test "$(stat -c '%U:%G %a' $conf)" = "root:$pkg 640"
  check "$pkg: /etc/$pkg is root:$pkg 0750" test "$(stat -c '%U:%G %a' /etc/$pkg)" = "root:$pkg 750"
  check "$pkg: config is a conffile" grep -qx "$conf" "/var/lib/dpkg/info/$pkg.conffiles"
  check "$pkg: man page installed" test -s /usr/share/man/man1/$pkg.1.gz
  for section in FILES SIGNALS EXAMPLES; do
    check "$pkg: man page has $section" sh -c "zcat /usr/share/man/man1/$pkg.1.gz | grep -q '^\.Sh $section'"
  done
  check "$pkg: the configuration file has its page ($pkg.yaml(5))" test -s /usr/share/man/man5/$pkg.yaml.5.gz
  check "$pkg: the example configuration is installed under /usr/share/doc" \
    test -s /usr/share/doc/$pkg/examples/$([ $pkg = scim-edge ] && echo agent || echo broker).example.yaml
  check "$pkg: its alert rules are installed and pass promtool" promtool check rules /usr/share/doc/$pkg/examples/$pkg.rules.yml
  check "$pkg: the Grafana dashboard is installed (JSON)" \
    python3 -c 'import json, sys; json.load(open(sys.argv[1]))["panels"][0]' /usr/share/doc/$pkg/examples/scim-edge-federation.dashboard.json
  check "$pkg: unit enabled on first install" test -L /etc/systemd/system/multi-user.target.wants/$pkg.service
  # Asked of the service user, not of every process: another agent on this machine (a test's) is not this package's.
  check "$pkg: not started on first install" sh -c "! pgrep -u $pkg"
  check "$pkg: systemd-analyze verify passes" systemd-analyze verify /lib/systemd/system/$pkg.service
  # The shipped configuration is unconfigured: check-config fails and says why.
  out=$($pkg check-config "$conf" 2>&1); rc=$?
  check "$pkg: check-config on the shipped config fails" test "$rc" -ne 0
  check "$pkg: ... with a clear message naming a missing file" grep -q "No such file or directory" <<<"$out"
  check "$pkg: ... and no crash" no_crash "$out"
  # As the unit's ExecStartPre runs it: as the service user, checking as that user.
  check "$pkg: ExecStartPre checks as the service user" \
    grep -qx "ExecStartPre=/usr/bin/$pkg check-config --as-user $pkg $conf" /lib/systemd/system/$pkg.service
  out=$(runuser -u $pkg -- $pkg check-config --as-user $pkg "$conf" 2>&1); rc=$?
  check "$pkg: ... which fails on the shipped config (exit 1)" test "$rc" -eq 1
  check "$pkg: ... naming a missing file at its line" grep -q "^$conf:[0-9]*:[0-9]*: .*No such file or directory" <<<"$out"
  check "$pkg: ... and no crash" no_crash "$out"
done
check "unit hardening: ProtectSystem=strict" grep -qx ProtectSystem=strict /lib/systemd/system/scim-edge.service
check "unit hardening: empty CapabilityBoundingSet" grep -qx CapabilityBoundingSet= /lib/systemd/system/scim-edge.service
check "unit: ExecReload sends SIGHUP" grep -q 'ExecReload=/bin/kill -HUP $MAINPID' /lib/systemd/system/scim-edge.service

# Data written by the service user, and a locally edited config.
start_agent
rss=$(awk '$1=="VmRSS:" {print int($2/1024)}' /proc/$agent/status)
check "the installed agent serves as its user" test "$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer t' \
  -H 'Content-Type: application/scim+json' -d '{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"kept"}' \
  "http://127.0.0.1:$port/scim/v2/Users")" = 201
kill -TERM $agent; wait $agent 2>/dev/null
check "the data belongs to the service user" test "$(stat -c %U /var/lib/scim-edge/data.mdb)" = scim-edge
echo "# edited here" >>/etc/scim-edge/agent.yaml

# Upgrade to a newer build: data and the edited config stay, and a running service restarts.
# systemd is not PID 1 here: the maintainer scripts' calls are recorded by stand-ins on PATH, with
# /run/systemd/system present as on a booted system.
PKG_VERSION="${version}+upgrade1" bash scripts/deb.sh >/dev/null
mkdir -p "$work/bin"
for tool in systemctl deb-systemd-invoke deb-systemd-helper; do
  printf '#!/bin/sh\necho "%s $*" >>%s/calls.log\n' "$tool" "$work" >"$work/bin/$tool"; chmod +x "$work/bin/$tool"
done
fake_systemd=0; [ -d /run/systemd/system ] || { mkdir -p /run/systemd/system; fake_systemd=1; }
check "dpkg -i of a newer build upgrades" env PATH="$work/bin:$PATH" dpkg -i --force-confold "dist/scim-edge_${version}+upgrade1_${arch}.deb"
check "upgrade: the service is restarted (try-restart: only if it runs)" grep -qx "deb-systemd-invoke try-restart scim-edge.service" "$work/calls.log"
check "upgrade: systemd reloads the units" grep -qx "systemctl --system daemon-reload" "$work/calls.log"
check "upgrade: never a plain start" sh -c "! grep -q ' start ' '$work/calls.log'"
: >"$work/calls.log"
check "dpkg -r stops the service" env PATH="$work/bin:$PATH" dpkg -r scim-broker
check "remove: stop was called" grep -qx "deb-systemd-invoke stop scim-broker.service" "$work/calls.log"
[ $fake_systemd -eq 1 ] && rmdir /run/systemd/system 2>/dev/null; rmdir /run/systemd 2>/dev/null || true
check "upgrade: package version" test "$(dpkg-query -W -f='${Version}' scim-edge)" = "${version}+upgrade1"
check "upgrade: data kept" test -s /var/lib/scim-edge/data.mdb
check "upgrade: edited config kept" grep -q "# edited here" /etc/scim-edge/agent.yaml
start_agent
check "upgrade: the stored user is served by the new build" grep -q '"totalResults":1' <<<"$(curl -s -H 'Authorization: Bearer t' \
  "http://127.0.0.1:$port/scim/v2/Users?filter=userName%20eq%20%22kept%22")"
kill -TERM $agent; wait $agent 2>/dev/null
rm -f "dist/scim-edge_${version}+upgrade1_${arch}.deb" "dist/scim-broker_${version}+upgrade1_${arch}.deb"

# Remove keeps data and config; purge deletes them.
check "dpkg -r removes" dpkg -r scim-edge
check "remove: binary gone" test ! -e /usr/bin/scim-edge
check "remove: data kept" test -s /var/lib/scim-edge/data.mdb
check "remove: config kept" test -f /etc/scim-edge/agent.yaml
check "dpkg -P purges" dpkg -P scim-edge
check "purge: data deleted" test ! -e /var/lib/scim-edge
check "purge: config deleted" test ! -e /etc/scim-edge/agent.yaml

installed=$(dpkg-deb -f "$edge" Installed-Size)
echo "footprint: scim-edge .deb $(($(stat -c %s "$edge") / 1024)) KiB, scim-broker .deb $(($(stat -c %s "$broker") / 1024)) KiB;" \
  "scim-edge installed $((installed / 1024)) MiB, binary $(($(dpkg-deb --fsys-tarfile "$edge" | tar -xO ./usr/bin/scim-edge | wc -c) / 1024 / 1024)) MiB;" \
  "idle agent RSS ${rss} MiB"
echo "test-deb: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
