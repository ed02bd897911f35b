#!/usr/bin/env bash
# Build the Bulwark test guest: OUT_DIR/vmlinuz + OUT_DIR/initrd.img.
#
#   scripts/guest/build.sh [OUT_DIR]      (default: <repo>/target/guest)
#
# Offline apart from `apt-get download` of the Debian cloud kernel package and of
# qemu-guest-agent (extracted, never installed; plus the Debian library packages
# qemu-ga needs if the host lacks any of its libraries).
# The initramfs holds static busybox, the host's mke2fs/e2fsck (real ext4 with
# a journal), qemu-ga, their shared libraries, a few kernel modules and /init.
# Cached: if the outputs exist and the stamp matches sha256(init + build.sh),
# it only prints the paths. See scripts/guest/README.md for the guest contract.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/target/guest}
KMETA=linux-image-cloud-amd64
QGAPKG=qemu-guest-agent
MULTIARCH=x86_64-linux-gnu
# Modules we want; their dependencies are added automatically.
WANT_MODULES="virtio_pci virtio_blk virtio_net virtio_console button evdev"

die() { echo "build.sh: error: $*" >&2; exit 1; }
need() { # need TOOL PACKAGE
    command -v "$1" >/dev/null 2>&1 || die "host tool '$1' is missing: apt-get install $2"
}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAMP=$(cat "$HERE/init" "$HERE/build.sh" | sha256sum | cut -d' ' -f1)

if [[ -f $OUT/vmlinuz && -f $OUT/initrd.img && "$(cat "$OUT/stamp" 2>/dev/null)" == "$STAMP" ]]; then
    echo "$OUT/vmlinuz"
    echo "$OUT/initrd.img"
    exit 0
fi

need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need cpio cpio
need gzip gzip
need sha256sum coreutils
need ldd libc-bin
need busybox busybox-static
BUSYBOX=$(command -v busybox)
[[ "$(ldd "$BUSYBOX" 2>&1 || true)" == *"not a dynamic executable"* ]] \
    || die "$BUSYBOX is not statically linked: apt-get install busybox-static"
E2BIN=
for d in /sbin /usr/sbin; do [[ -x $d/mke2fs && -x $d/e2fsck ]] && { E2BIN=$d; break; }; done
[[ -n $E2BIN ]] || die "host tools mke2fs/e2fsck are missing: apt-get install e2fsprogs"

CACHE=$OUT/cache
mkdir -p "$CACHE/debs"

# apt_download PKG: into the cache; stale package lists (a mirror moved on since the
# machine's last `apt-get update`) are refreshed once, as root, and the download retried.
APT_REFRESHED=
apt_download() {
    (cd "$CACHE/debs" && apt-get download "$1" >&2) && return 0
    [[ -z $APT_REFRESHED && $(id -u) == 0 ]] || return 1
    APT_REFRESHED=1
    echo "build.sh: apt-get update, then retrying $1" >&2
    apt-get update -qq >&2 && (cd "$CACHE/debs" && apt-get download "$1" >&2)
}

# fetch_deb PKG: path of PKG's .deb in the cache, downloaded first if not cached
fetch_deb() {
    local deb
    deb=$(ls "$CACHE/debs/$1"_*.deb 2>/dev/null | tail -n1 || true)
    if [[ -z $deb ]]; then
        echo "build.sh: downloading $1" >&2
        apt_download "$1" \
            || die "apt-get download $1 failed (needs a Debian mirror; try apt-get update)"
        deb=$(ls "$CACHE/debs/$1"_*.deb | tail -n1)
    fi
    echo "$deb"
}

# --- kernel package: resolve the meta package locally, download only if not cached
kernel_pkg() {
    apt-cache depends "$KMETA" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }' || true
}
KPKG=$(kernel_pkg)
if [[ -z $KPKG && $(id -u) == 0 ]] && ! ls "$CACHE/debs"/linux-image-*-cloud-amd64_*.deb >/dev/null 2>&1; then
    # no package lists yet (a fresh machine): fetch them once
    APT_REFRESHED=1
    apt-get update -qq >&2 || true
    KPKG=$(kernel_pkg)
fi
if [[ -n $KPKG ]]; then
    DEB=$(ls "$CACHE/debs/${KPKG}"_*.deb 2>/dev/null | tail -n1 || true)
    if [[ -z $DEB ]]; then
        echo "build.sh: downloading $KPKG" >&2
        apt_download "$KPKG" \
            || die "apt-get download $KPKG failed (needs a Debian mirror; try apt-get update)"
        DEB=$(ls "$CACHE/debs/${KPKG}"_*.deb | tail -n1)
    fi
else
    # no apt lists: fall back to whatever was cached before
    DEB=$(ls "$CACHE/debs"/linux-image-*-cloud-amd64_*.deb 2>/dev/null | tail -n1 || true)
    [[ -n $DEB ]] || die "cannot resolve $KMETA (run apt-get update) and nothing is cached"
fi
echo "build.sh: kernel package $(basename "$DEB")" >&2
QGADEB=$(fetch_deb "$QGAPKG")
echo "build.sh: guest agent package $(basename "$QGADEB")" >&2

KX=$CACHE/kernel
rm -rf "$KX"
dpkg-deb -x "$DEB" "$KX"
VMLINUZ=$(ls "$KX"/boot/vmlinuz-* | head -n1)
MODDIR=$(ls -d "$KX"/lib/modules/* | head -n1)

# --- modules, dependencies first (read from each .ko's .modinfo section)
mod_path() { find "$MODDIR/kernel" -name "$1.ko" | head -n1; }
mod_deps() { tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | tr ',' ' '; }
ORDER=()
add_mod() {
    local m=$1 p d
    for d in "${ORDER[@]:-}"; do [[ $d == "$m" ]] && return 0; done
    if grep -q "/$m\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; then return 0; fi
    p=$(mod_path "$m")
    [[ -n $p ]] || die "module $m not found in $(basename "$DEB")"
    for d in $(mod_deps "$p"); do add_mod "${d//-/_}"; done
    ORDER+=("$m")
}
for m in $WANT_MODULES; do add_mod "$m"; done

# --- initramfs tree
ROOT=$CACHE/root
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,mnt,run,tmp,etc,lib/modules,lib64}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [[ $a == busybox || -e $ROOT/bin/$a ]] || ln -s busybox "$ROOT/bin/$a"
done
for m in "${ORDER[@]}"; do
    cp "$(mod_path "$m")" "$ROOT/lib/modules/$m.ko"
    echo "$m" >>"$ROOT/lib/modules/load.order"
done
# --- shared libraries: the host's; those the host lacks come from Debian library
# packages extracted into LIBROOT (never installed)
LIBROOT=$CACHE/libroot
LIBPATH=
use_libroot() { LIBPATH=$LIBROOT/lib/$MULTIARCH:$LIBROOT/usr/lib/$MULTIARCH; }
[[ -d $LIBROOT ]] && use_libroot
bin_ldd() { LD_LIBRARY_PATH=$LIBPATH ldd "$1" 2>/dev/null || true; }
ldd_paths() { awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'; }
missing_libs() { bin_ldd "$1" | awk '$2 == "=>" && $3 == "not" { print $1 }'; }
# deb_deps DEB: the library packages DEB depends on (first alternative; libc6 is the host's)
deb_deps() {
    dpkg-deb -f "$1" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/:any//' |
        awk '$1 ~ /^(lib|zlib)/ && $1 != "libc6" { print $1 }'
}
# fetch_libs BIN DEB: download DEB's library dependencies, then theirs (breadth
# first), into LIBROOT until ldd finds all of BIN's libraries
fetch_libs() {
    local bin=$1 todo next p deb round=0 seen=" "
    todo=$(deb_deps "$2")
    mkdir -p "$LIBROOT"
    use_libroot
    while [[ -n $(missing_libs "$bin") ]]; do
        [[ -n ${todo// /} && $round -lt 6 ]] \
            || die "$(basename "$bin"): cannot find $(missing_libs "$bin" | tr '\n' ' ')in Debian packages"
        round=$((round + 1))
        next=
        for p in $todo; do
            [[ $seen == *" $p "* ]] && continue
            seen+="$p "
            deb=$(fetch_deb "$p")
            dpkg-deb -x "$deb" "$LIBROOT"
            [[ -z $(missing_libs "$bin") ]] && return 0
            next+=" $(deb_deps "$deb" | tr '\n' ' ')"
        done
        todo=$next
    done
}
# add_bin SRC DEST [DEB]: copy the executable SRC to ROOT/DEST with its libraries and
# loader, preferring the host's copy of each library
add_bin() {
    local lib dst h host
    cp -L "$1" "$ROOT$2"
    if [[ -n $(missing_libs "$1") ]]; then
        [[ -n ${3:-} ]] || die "$1: missing libraries: $(missing_libs "$1" | tr '\n' ' ')"
        echo "build.sh: $(basename "$1"): host lacks $(missing_libs "$1" | tr '\n' ' ')- fetching Debian packages" >&2
        fetch_libs "$1" "$3"
    fi
    host=$(ldd "$1" 2>/dev/null | ldd_paths || true)
    for lib in $(bin_ldd "$1" | ldd_paths); do
        for h in $host; do [[ ${h##*/} == "${lib##*/}" ]] && lib=$h; done
        dst=${lib#"$LIBROOT"}
        mkdir -p "$ROOT$(dirname "$dst")"
        cp -L "$lib" "$ROOT$dst"
    done
}
# host e2fsprogs (busybox mke2fs only makes ext2)
for t in mke2fs e2fsck; do add_bin "$E2BIN/$t" "/sbin/$t"; done
# qemu-ga from the Debian package; fsfreeze hook scripts are left out (hooks off)
QX=$CACHE/qga
rm -rf "$QX"
dpkg-deb -x "$QGADEB" "$QX"
add_bin "$QX/usr/sbin/qemu-ga" /sbin/qemu-ga "$QGADEB"
[[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$ROOT/etc/"
cp "$HERE/init" "$ROOT/init"
chmod 755 "$ROOT/init"

# --- pack (tmp + rename so a failed build never leaves a half-written output)
(cd "$ROOT" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9 >"$OUT/initrd.img.tmp"
cp "$VMLINUZ" "$OUT/vmlinuz.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
echo "$STAMP" >"$OUT/stamp"
echo "build.sh: modules: ${ORDER[*]}" >&2
echo "$OUT/vmlinuz"
echo "$OUT/initrd.img"
