#!/usr/bin/env bash
# Builds the steward-controlplane and steward-agent packages, .deb and .rpm, from the workspace's
# binaries, with dpkg-deb and rpmbuild only (no cargo plugins).
#
#   packaging/build-packages.sh [--profile release|debug] [--version X] [--out DIR]
#                               [--no-build] [--bin-dir DIR] [--no-rpm]
#
#   --profile   cargo profile to build and package (default release; debug = cargo's dev)
#   --version   package version (default: the workspace version in Cargo.toml)
#   --out       where the packages go (default target/packages)
#   --no-build  package already built binaries instead of running cargo build
#   --bin-dir   directory holding the binaries (default target/<profile dir>; implies --no-build)
#   --no-rpm    .deb only (rpmbuild comes with Debian's `rpm` package; install-deps.sh installs it)
#
# Layout (see docs/packaging.md):
#   steward-controlplane: /usr/bin/steward-controlplane, /usr/bin/stewardctl,
#       /etc/steward/controlplane.toml (conffile), <unitdir>/steward-controlplane.service
#   steward-agent: /usr/bin/steward-agent, /etc/steward/agent.toml (conffile),
#       <unitdir>/steward-agent.service
# <unitdir> is /lib/systemd/system in the .deb and /usr/lib/systemd/system in the .rpm.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
profile=release
version=""
out=""
build=1
bin_dir=""
want_rpm=1

die() {
    echo "build-packages: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
        --profile=*) profile="${1#*=}"; shift ;;
        --version) version="${2:?--version needs a value}"; shift 2 ;;
        --version=*) version="${1#*=}"; shift ;;
        --out) out="${2:?--out needs a value}"; shift 2 ;;
        --out=*) out="${1#*=}"; shift ;;
        --bin-dir) bin_dir="${2:?--bin-dir needs a value}"; build=0; shift 2 ;;
        --bin-dir=*) bin_dir="${1#*=}"; build=0; shift ;;
        --no-build) build=0; shift ;;
        --no-rpm) want_rpm=0; shift ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

case "$profile" in
    release) cargo_profile=release; profile_dir=release ;;
    debug | dev) cargo_profile=dev; profile_dir=debug ;;
    *) die "--profile must be release or debug, not '$profile'" ;;
esac

if [ -z "$version" ]; then
    version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml")
    [ -n "$version" ] || die "no version in $repo/Cargo.toml; pass --version"
fi
# Valid as a Debian upstream version and as an RPM Version (no '-').
[[ "$version" =~ ^[0-9][A-Za-z0-9.+~]*$ ]] || die "version '$version' must start with a digit and use only A-Z a-z 0-9 . + ~"

target_dir="${CARGO_TARGET_DIR:-$repo/target}"
[ -n "$out" ] || out="$target_dir/packages"
[ -n "$bin_dir" ] || bin_dir="$target_dir/$profile_dir"

command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found (it comes with dpkg)"
if [ "$want_rpm" = 1 ] && ! command -v rpmbuild >/dev/null 2>&1; then
    die "rpmbuild not found: install it (apt-get install rpm, or make deps) or pass --no-rpm"
fi

if [ "$build" = 1 ]; then
    echo "build-packages: cargo build --profile $cargo_profile"
    (cd "$repo" && cargo build --profile "$cargo_profile" -p steward-controlplane -p steward-agent --bins)
fi
for b in steward-controlplane stewardctl steward-agent; do
    [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing: build it (cargo build --profile $cargo_profile --bins) or drop --no-build"
done

deb_arch=$(dpkg --print-architecture)
case "$deb_arch" in
    amd64) rpm_arch=x86_64 ;;
    arm64) rpm_arch=aarch64 ;;
    i386) rpm_arch=i686 ;;
    armhf) rpm_arch=armv7hl ;;
    *) rpm_arch=$(uname -m) ;;
esac

# Fast compression for debug builds (large binaries, packages only for tests); xz for release.
if [ "$profile_dir" = release ]; then
    deb_compress=(-Zxz)
    rpm_payload=w6.xzdio
else
    deb_compress=(-Zgzip -z1)
    rpm_payload=w1.gzdio
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# libc6 version the binaries need (the newest GLIBC_ symbol version they use).
libc_dep="libc6"
if command -v objdump >/dev/null 2>&1; then
    glibc=$(for b in steward-controlplane stewardctl steward-agent; do objdump -T "$bin_dir/$b"; done \
        | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1 || true)
    [ -n "$glibc" ] && libc_dep="libc6 (>= $glibc)"
fi
# STEWARD_MAINTAINER may add a contact address: "Steward maintainers <ops@example.com>".
maintainer="${STEWARD_MAINTAINER:-Steward maintainers}"

# Hard link when possible (same file system): no copy of large debug binaries.
put_bin() {
    install -d "$(dirname "$2")"
    ln -f "$1" "$2" 2>/dev/null || cp "$1" "$2"
    chmod 0755 "$2"
}

# A maintainer script: the shared functions, then the action's body ($3: postinst, prerm or postrm).
maint_script() {
    local pkg=$1 format=$2 action=$3
    printf '#!/bin/sh\n# %s %s, generated by packaging/build-packages.sh from packaging/scripts/\nset -e\n' "$pkg" "$action"
    printf 'STEWARD_PKG=%s\nSTEWARD_FORMAT=%s\n\n' "$pkg" "$format"
    cat "$repo/packaging/scripts/common.sh"
    echo
    cat "$repo/packaging/scripts/$action.sh"
}

# Stages one package's files under $work/<pkg>/root with the unit in $2.
stage() {
    local pkg=$1 unitdir=$2 root="$work/$1/root"
    rm -rf "$root"
    case "$pkg" in
        steward-controlplane)
            put_bin "$bin_dir/steward-controlplane" "$root/usr/bin/steward-controlplane"
            put_bin "$bin_dir/stewardctl" "$root/usr/bin/stewardctl"
            install -D -m 0644 "$repo/packaging/controlplane.toml" "$root/etc/steward/controlplane.toml"
            ;;
        steward-agent)
            put_bin "$bin_dir/steward-agent" "$root/usr/bin/steward-agent"
            install -D -m 0644 "$repo/packaging/agent.toml" "$root/etc/steward/agent.toml"
            ;;
    esac
    install -D -m 0644 "$repo/systemd/$pkg.service" "$root$unitdir/$pkg.service"
    install -D -m 0644 "$repo/docs/packaging.md" "$root/usr/share/doc/$pkg/packaging.md"
    chmod 0755 "$root" "$root/usr" "$root/usr/bin" "$root/etc" "$root/etc/steward"
}

summary() {
    case "$1" in
        steward-controlplane) echo "Steward control plane: PostgreSQL fleet management (node and stewardctl)" ;;
        steward-agent) echo "Steward host agent: runs PostgreSQL for the Steward control plane" ;;
    esac
}

description() {
    case "$1" in
        steward-controlplane)
            echo "One node of the Steward control plane: the Raft-replicated inventory of PostgreSQL"
            echo "clusters, the REST API for product teams and the gRPC service for agents and"
            echo "operators, run by the steward-controlplane service as the steward user; and"
            echo "stewardctl, the operator command line."
            ;;
        steward-agent)
            echo "The Steward agent of a database host: it runs the host's PostgreSQL instances as"
            echo "the postgres user and carries out the control plane's commands (create, fail over,"
            echo "move, back up, restore). Run by the steward-agent service as root."
            ;;
    esac
}

build_deb() {
    local pkg=$1 config=$2 depends=$3 dir="$work/$1" root="$work/$1/root"
    stage "$pkg" /lib/systemd/system
    install -d -m 0755 "$root/DEBIAN"
    local size
    size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
    {
        echo "Package: $pkg"
        echo "Version: $version"
        echo "Architecture: $deb_arch"
        echo "Maintainer: $maintainer"
        echo "Installed-Size: $size"
        echo "Depends: $depends"
        echo "Section: database"
        echo "Priority: optional"
        echo "Description: $(summary "$pkg")"
        description "$pkg" | sed 's/^/ /'
    } >"$root/DEBIAN/control"
    echo "/etc/steward/$config" >"$root/DEBIAN/conffiles"
    for action in postinst prerm postrm; do
        maint_script "$pkg" deb "$action" >"$root/DEBIAN/$action"
        chmod 0755 "$root/DEBIAN/$action"
    done
    local file="$out/${pkg}_${version}_${deb_arch}.deb"
    dpkg-deb "${deb_compress[@]}" --root-owner-group --build "$root" "$file" >/dev/null
    echo "build-packages: $file"
    rm -rf "$root"
}

# rpm scriptlets: the Debian scripts, with rpm's arguments translated ($1 = number of versions
# installed once the transaction is done: 0 on erase, 1 on install, 2 on upgrade).
rpm_scriptlets() {
    local pkg=$1
    echo "%post"
    echo 'if [ "$1" -ge 2 ]; then set -- configure upgrade; else set -- configure ""; fi'
    maint_script "$pkg" rpm postinst | sed 1d
    echo
    echo "%preun"
    echo 'if [ "$1" -eq 0 ]; then set -- remove; else set -- upgrade; fi'
    maint_script "$pkg" rpm prerm | sed 1d
    echo
    echo "%postun"
    echo 'if [ "$1" -eq 0 ]; then set -- remove; else set -- upgrade; fi'
    maint_script "$pkg" rpm postrm | sed 1d
}

build_rpm() {
    local pkg=$1 config=$2 requires=$3 dir="$work/$1"
    local root="$dir/root" top="$dir/rpmbuild"
    stage "$pkg" /usr/lib/systemd/system
    mkdir -p "$top"/{BUILD,BUILDROOT,RPMS,SPECS,SOURCES,SRPMS,tmp}
    local spec="$top/SPECS/$pkg.spec"
    {
        echo "# generated by packaging/build-packages.sh: packages prebuilt binaries as they are"
        echo "%global debug_package %{nil}"
        echo "%global __os_install_post %{nil}"
        echo "%global _build_id_links none"
        echo "Name: $pkg"
        echo "Version: $version"
        echo "Release: 1"
        echo "Summary: $(summary "$pkg")"
        echo "License: Apache-2.0"
        echo "Packager: $maintainer"
        [ -n "$requires" ] && echo "Requires: $requires"
        echo "Requires(post): /usr/sbin/useradd, /usr/sbin/groupadd"
        echo
        echo "%description"
        description "$pkg"
        echo
        echo "%install"
        echo "mkdir -p %{buildroot}"
        # hard links when possible: no second copy of the binaries
        echo "cp -al '$root'/. %{buildroot}/ 2>/dev/null || cp -a '$root'/. %{buildroot}/"
        echo
        echo "%files"
        echo "%dir %attr(0755,root,root) /etc/steward"
        echo "%config(noreplace) %attr(0644,root,root) /etc/steward/$config"
        echo "%attr(0644,root,root) /usr/lib/systemd/system/$pkg.service"
        echo "%doc %attr(0644,root,root) /usr/share/doc/$pkg/packaging.md"
        case "$pkg" in
            steward-controlplane)
                echo "%attr(0755,root,root) /usr/bin/steward-controlplane"
                echo "%attr(0755,root,root) /usr/bin/stewardctl"
                ;;
            steward-agent)
                echo "%attr(0755,root,root) /usr/bin/steward-agent"
                ;;
        esac
        echo
        rpm_scriptlets "$pkg"
    } >"$spec"
    rpmbuild -bb --quiet --target "$rpm_arch" \
        --define "_topdir $top" \
        --define "_tmppath $top/tmp" \
        --define "_rpmdir $out" \
        --define "_rpmfilename %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
        --define "_binary_payload $rpm_payload" \
        "$spec" >"$dir/rpmbuild.log" 2>&1 || {
        cat "$dir/rpmbuild.log" >&2
        die "rpmbuild failed for $pkg"
    }
    echo "build-packages: $out/$pkg-$version-1.$rpm_arch.rpm"
    rm -rf "$dir"
}

pg_alternatives="postgresql-15 | postgresql-16 | postgresql-17 | postgresql-14"
build_deb steward-controlplane controlplane.toml "adduser, $libc_dep, libgcc-s1"
build_deb steward-agent agent.toml "adduser, $pg_alternatives, $libc_dep, libgcc-s1"
if [ "$want_rpm" = 1 ]; then
    build_rpm steward-controlplane controlplane.toml ""
    # Fedora/RHEL name the server package postgresql-server; PGDG's are postgresqlNN-server.
    build_rpm steward-agent agent.toml "(postgresql-server or postgresql17-server or postgresql16-server or postgresql15-server or postgresql14-server)"
fi
