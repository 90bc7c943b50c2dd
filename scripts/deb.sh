#!/usr/bin/env bash
# Builds dist/scim-edge_<version>_<arch>.deb and dist/scim-broker_<version>_<arch>.deb
# with dpkg-deb from packaging/: release build with the Swift runtime linked
# statically, stripped; man pages generated from the command-line
# definitions; commented conffiles; hardened systemd units. Depends lists
# the Debian runtime libraries the binaries link, and the build fails when
# packaging/debian/<pkg>.libraries no longer matches what ldd reports.
# PKG_VERSION overrides the package version (upgrade tests); the binaries
# always report VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${PKG_VERSION:-$(tr -d ' \n' < VERSION)}
arch=$(dpkg --print-architecture)
scratch=.build/static
mkdir -p dist
# scim-edge first: it renders both configuration files' man pages.
for p in scim-edge scim-broker; do
  bash scripts/retry-on-crash.sh swift build -c release --static-swift-stdlib --scratch-path "$scratch" --product "$p" >/dev/null
done
bash scripts/retry-on-crash.sh swift build --product generate-manual >/dev/null
manual=$(swift build --show-bin-path)/generate-manual

# The package owning a shared library (usrmerge: /lib and /usr/lib are one).
owner() {
  local p=$1 r o c
  r=$(readlink -f "$p")
  for c in "$p" "$r" "/usr$p" "${r#/usr}" "$(dirname "$p")/$(basename "$r")" "/usr$(dirname "$p")/$(basename "$r")"; do
    o=$(dpkg -S "$c" 2>/dev/null | head -1 | cut -d: -f1)
    [ -n "$o" ] && { echo "$o"; return; }
  done
  echo "unknown($p)"
}

build_package() { # package conf-file example-config
  local pkg=$1 conf=$2 example=$3
  local stage; stage=$(mktemp -d)
  trap 'rm -rf "$stage"' RETURN
  chmod 0755 "$stage"
  install -D -m 0755 "$scratch/release/$pkg" "$stage/usr/bin/$pkg"
  strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage/usr/bin/$pkg"

  # Depends: exactly the libraries ldd reports, checked against the declared list.
  local linked declared
  linked=$(ldd "$stage/usr/bin/$pkg" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r l; do owner "$l"; done | sort -u | tr '\n' ' ')
  declared=$(tr -s ' \n' '\n' < "packaging/debian/$pkg.libraries" | sed '/^$/d' | sort -u | tr '\n' ' ')
  if [ "$linked" != "$declared" ]; then
    echo "deb: $pkg links [$linked] but packaging/debian/$pkg.libraries declares [$declared]" >&2
    exit 1
  fi
  local depends=""
  for d in $linked; do
    local v; v=$(dpkg-query -W -f='${Version}' "$d" | sed -E 's/^[0-9]+://; s/[-+~].*$//')
    depends="${depends:+$depends, }$d (>= $v)"
  done

  # Man page from the command-line definitions.
  mkdir -p "$stage/usr/share/man/man1"
  "$manual" "$stage/usr/bin/$pkg" --output-directory "$stage/usr/share/man/man1" --section 1 \
    --authors "the scim-edge developers" --date "$(date -u +%Y-%m-%d)" >/dev/null
  # FILES, SIGNALS, EXAMPLES and SEE ALSO (written by hand) go before AUTHORS.
  awk -v extra="packaging/man/$pkg.1.extra" '/^\.Sh AUTHORS/ { while ((getline l < extra) > 0) print l } { print }' \
    "$stage/usr/share/man/man1/$pkg.1" >"$stage/$pkg.1" && mv "$stage/$pkg.1" "$stage/usr/share/man/man1/$pkg.1"
  grep -q '^\.Sh SIGNALS' "$stage/usr/share/man/man1/$pkg.1" || { echo "deb: no SIGNALS section in $pkg.1" >&2; exit 1; }
  gzip -9n "$stage/usr/share/man/man1/$pkg.1"
  # The configuration file's own page, rendered from the option table (as docs/configuration.md is),
  # and the example (the conffile is edited; the example stays as shipped).
  mkdir -p "$stage/usr/share/man/man5"
  "$scratch/release/scim-edge" reference --man "$pkg" --date "$(date -u +%Y-%m-%d)" >"$stage/usr/share/man/man5/$pkg.yaml.5"
  grep -q '^\.It Ic dataDir' "$stage/usr/share/man/man5/$pkg.yaml.5" || { echo "deb: $pkg.yaml.5 has no keys" >&2; exit 1; }
  gzip -9n "$stage/usr/share/man/man5/$pkg.yaml.5"
  install -D -m 0644 "$example" "$stage/usr/share/doc/$pkg/examples/$(basename "$example")"
  # Monitoring (packaging/monitoring): the package's Prometheus alert rules and the federation's Grafana dashboard.
  install -D -m 0644 "packaging/monitoring/$pkg.rules.yml" "$stage/usr/share/doc/$pkg/examples/$pkg.rules.yml"
  install -D -m 0644 packaging/monitoring/scim-edge-federation.dashboard.json \
    "$stage/usr/share/doc/$pkg/examples/scim-edge-federation.dashboard.json"

  install -D -m 0640 "$example" "$stage/etc/$pkg/$conf"
  install -D -m 0644 "packaging/systemd/$pkg.service" "$stage/lib/systemd/system/$pkg.service"
  install -D -m 0644 packaging/debian/copyright "$stage/usr/share/doc/$pkg/copyright"
  # The configuration may hold secrets' paths and is read by the service group only (postinst sets the group).
  printf '%s: non-standard-file-perm 0640 != 0644 [etc/%s/%s]\n' "$pkg" "$pkg" "$conf" \
    | install -D -m 0644 /dev/stdin "$stage/usr/share/lintian/overrides/$pkg"
  sed -e "s/@PACKAGE@/$pkg/g" -e "s/@VERSION@/$version/g" -e "s/@DATE@/$(date -uR)/" packaging/debian/changelog.in \
    | gzip -9n >"$stage/usr/share/doc/$pkg/changelog.gz"
  chmod 0644 "$stage/usr/share/doc/$pkg/changelog.gz"

  mkdir -p "$stage/DEBIAN"
  echo "/etc/$pkg/$conf" >"$stage/DEBIAN/conffiles"
  for s in postinst prerm postrm; do
    sed -e "s/@PACKAGE@/$pkg/g" -e "s/@CONF@/$conf/g" "packaging/debian/$s.in" >"$stage/DEBIAN/$s"
    chmod 0755 "$stage/DEBIAN/$s"
  done
  local size; size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
  local summary; summary=$(head -1 "packaging/debian/$pkg.summary")
  python3 - "$stage/DEBIAN/control" "$pkg" "$version" "$arch" "$size" "$depends" "packaging/debian/$pkg.summary" <<'PY'
import sys
out, pkg, version, arch, size, depends, summary = sys.argv[1:]
lines = open(summary).read().rstrip("\n").split("\n")
text = open("packaging/debian/control.in").read()
for k, v in {"@PACKAGE@": pkg, "@VERSION@": version, "@ARCH@": arch, "@INSTALLED_SIZE@": size,
             "@DEPENDS@": depends, "@SUMMARY@": lines[0], "@DESCRIPTION@\n": "\n".join(lines[1:]) + "\n"}.items():
    text = text.replace(k, v)
open(out, "w").write(text)
PY
  (cd "$stage" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | sort | xargs md5sum >DEBIAN/md5sums)
  chmod 0644 "$stage/DEBIAN/md5sums" "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles"
  dpkg-deb --root-owner-group -Zxz --build "$stage" "dist/${pkg}_${version}_${arch}.deb" >/dev/null
  echo "dist/${pkg}_${version}_${arch}.deb"
}

build_package scim-edge agent.yaml packaging/agent.example.yaml
build_package scim-broker broker.yaml packaging/broker.example.yaml
