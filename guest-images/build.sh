#!/usr/bin/env bash
# Guest image builder: Debian packages only, no mounting, no loop devices.
#
# Builds, under guest-images/out/:
#   vmlinuz         the unmodified bzImage from the pinned Debian cloud kernel
#   initrd.img      uncompressed newc cpio: busybox + virtio modules + /init
#   guest.img       raw disk that is one ext4 filesystem (no partition table)
#   guest-mbr.img   the same ext4 filesystem in partition 1 of an MBR disk
#   build-info.txt  the package versions used
#
# Usage: guest-images/build.sh            (FORCE=1 to rebuild regardless)
# See guest-images/README.md.
set -euo pipefail

# ---- pinned inputs (override by environment) --------------------------------
KERNEL_ABI="${KERNEL_ABI:-6.1.0-53-cloud-amd64}"
KERNEL_VERSION="${KERNEL_VERSION:-6.1.187-1}"
KERNEL_PKG="${KERNEL_PKG:-linux-image-${KERNEL_ABI}-unsigned}"
BUSYBOX_PKG="busybox-static"
BUSYBOX_VERSION="${BUSYBOX_VERSION:-}"   # empty: cached .deb, else the candidate
ROOTFS_SIZE_MIB="${ROOTFS_SIZE_MIB:-64}"
GUEST_HOSTNAME="${GUEST_HOSTNAME:-guest}"
FORCE="${FORCE:-0}"

# Modules for the initramfs, in load (dependency) order.
INITRD_MODULES=(virtio virtio_ring virtio_mmio virtio_blk)

# ---- paths -------------------------------------------------------------------
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export LC_ALL=C
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
CACHE="$HERE/cache"
OUT="$HERE/out"
DEBS="$CACHE/debs"
REPO_ROOT="$(dirname "$HERE")"

STEPS=5
say() { printf '%s\n' "$*" >&2; }
step() { say "[$1/$STEPS] $2"; }
die() { say "error: $*"; exit 1; }
rel() { local p="$1"; printf '%s' "${p#"$REPO_ROOT"/}"; }

# apt-get download writes the epoch colon as %3a in file names.
deb_name() { printf '%s_%s_amd64.deb' "$1" "${2//:/%3a}"; }

KERNEL_DEB="$DEBS/$(deb_name "$KERNEL_PKG" "$KERNEL_VERSION")"
CONFIG_KEY="kernel=$KERNEL_PKG=$KERNEL_VERSION abi=$KERNEL_ABI busybox=${BUSYBOX_VERSION:-any} rootfs_mib=$ROOTFS_SIZE_MIB hostname=$GUEST_HOSTNAME spin_init=1 getpid_loop=1"
OUTPUTS=("$OUT/vmlinuz" "$OUT/initrd.img" "$OUT/guest.img" "$OUT/guest-mbr.img" "$OUT/build-info.txt")

# ---- up-to-date check (no tools, no network) ---------------------------------
info_get() { sed -n "/^$1=/{s///p;q}" "$OUT/build-info.txt" 2>/dev/null || true; }

up_to_date() {
    [ "$FORCE" = 1 ] && return 1
    local o i bb_deb
    for o in "${OUTPUTS[@]}"; do [ -f "$o" ] || return 1; done
    [ "$(info_get config)" = "$CONFIG_KEY" ] || return 1
    bb_deb="$(info_get busybox_deb)"
    [ -n "$bb_deb" ] && [ -f "$DEBS/$bb_deb" ] || return 1
    for o in "${OUTPUTS[@]}"; do
        for i in "$SELF" "$KERNEL_DEB" "$DEBS/$bb_deb"; do
            [ -f "$i" ] && [ "$o" -nt "$i" ] || return 1
        done
    done
}

if up_to_date; then
    say "guest image up to date: $(rel "$OUT/guest.img")"
    exit 0
fi

# ---- helpers -----------------------------------------------------------------
APT_LOG="$CACHE/apt.log"
APT_UPDATED=0
as_root_check() { [ "$(id -u)" = 0 ] || die "$1 needs root (run build.sh as root)"; }

apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    as_root_check "apt-get update"
    say "      apt-get update (log: $(rel "$APT_LOG"))"
    apt-get update -q >>"$APT_LOG" 2>&1 || say "warning: apt-get update failed, see $(rel "$APT_LOG")"
    APT_UPDATED=1
}

ensure_tools() {
    local need=() tool pkg
    for tool in "$@"; do
        case "$tool" in
            mkfs.ext4) pkg=e2fsprogs ;;
            sfdisk) pkg=fdisk ;;
            cpio) pkg=cpio ;;
            dpkg-deb) pkg=dpkg ;;
            tar) pkg=tar ;;
            xz) pkg=xz-utils ;;
            zstd) pkg=zstd ;;
            gzip) pkg=gzip ;;
            apt-get) pkg=apt ;;
            as|ld) pkg=binutils ;;
            *) die "no package known for tool $tool" ;;
        esac
        command -v "$tool" >/dev/null 2>&1 || need+=("$pkg")
    done
    [ "${#need[@]}" -eq 0 ] && return 0
    as_root_check "installing ${need[*]}"
    say "      installing host tools: ${need[*]}"
    local apt_install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}")
    if ! "${apt_install[@]}" >>"$APT_LOG" 2>&1; then
        apt_update_once
        "${apt_install[@]}" >>"$APT_LOG" 2>&1 \
            || die "could not install ${need[*]}; see $(rel "$APT_LOG")"
    fi
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool still missing after installing ${need[*]}"
    done
}

# apt_download PKG VERSION: fetch PKG=VERSION into $DEBS; returns non-zero if
# the registry does not serve it (after one apt-get update).
apt_download() {
    local pkg="$1" ver="$2" try
    for try in 1 2; do
        if apt-cache show "$pkg=$ver" >/dev/null 2>&1 &&
            (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver") >>"$APT_LOG" 2>&1 &&
            [ -f "$DEBS/$(deb_name "$pkg" "$ver")" ]; then
            return 0
        fi
        [ "$try" = 1 ] && apt_update_once
    done
    return 1
}

candidate_version() {
    apt-cache policy "$1" 2>/dev/null | sed -n '/^ *Candidate: /{s///;/^(none)$/d;p;q}' || true
}

# deb_extract DEB DEST [members...]: extract (a subset of) a .deb, atomically.
deb_extract() {
    local deb="$1" dest="$2"; shift 2
    local tmp="$dest.tmp.$$"
    rm -rf "$tmp"; mkdir -p "$tmp"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards "$@" \
        || { rm -rf "$tmp"; die "extracting $(basename "$deb") failed (members: $*)"; }
    rm -rf "$dest"; mv "$tmp" "$dest"
    touch "$dest/.extracted"
}

# modinfo field of a .ko without kmod: .modinfo holds NUL-separated key=value.
ko_field() {
    local v
    v="$(tr '\0' '\n' <"$1" | sed -n "s/^$2=//p")"
    printf '%s\n' "${v%%$'\n'*}"
}

mkdir -p "$CACHE" "$DEBS" "$OUT"
: >"$APT_LOG"

# ---- 1. host tools ---------------------------------------------------------------
step 1 "checking host tools (dpkg-deb, tar, cpio, mkfs.ext4, sfdisk, as, ld)"
ensure_tools apt-get dpkg-deb tar cpio mkfs.ext4 sfdisk as ld

# ---- 2. download ---------------------------------------------------------------
step 2 "downloading $KERNEL_PKG=$KERNEL_VERSION and $BUSYBOX_PKG"
if [ -f "$KERNEL_DEB" ]; then
    say "      cached: $(rel "$KERNEL_DEB")"
else
    apt_download "$KERNEL_PKG" "$KERNEL_VERSION" \
        || die "Debian no longer serves $KERNEL_PKG=$KERNEL_VERSION; update KERNEL_ABI/KERNEL_VERSION in guest-images/build.sh"
fi
[ "$(dpkg-deb -f "$KERNEL_DEB" Version)" = "$KERNEL_VERSION" ] \
    || die "$(rel "$KERNEL_DEB") is not version $KERNEL_VERSION (delete it and rerun)"

if [ -n "$BUSYBOX_VERSION" ]; then
    BB_DEB="$DEBS/$(deb_name "$BUSYBOX_PKG" "$BUSYBOX_VERSION")"
    [ -f "$BB_DEB" ] || apt_download "$BUSYBOX_PKG" "$BUSYBOX_VERSION" \
        || die "Debian does not serve $BUSYBOX_PKG=$BUSYBOX_VERSION; unset BUSYBOX_VERSION to use the current one"
else
    # Any version will do: reuse the newest cached one, else the candidate.
    BB_DEB=""
    for f in "$DEBS/${BUSYBOX_PKG}"_*_amd64.deb; do
        [ -f "$f" ] && { [ -z "$BB_DEB" ] || [ "$f" -nt "$BB_DEB" ]; } && BB_DEB="$f"
    done
    if [ -z "$BB_DEB" ]; then
        bb_ver="$(candidate_version "$BUSYBOX_PKG")"
        if [ -z "$bb_ver" ]; then apt_update_once; bb_ver="$(candidate_version "$BUSYBOX_PKG")"; fi
        if [ -z "$bb_ver" ] || ! apt_download "$BUSYBOX_PKG" "$bb_ver"; then
            die "could not download $BUSYBOX_PKG from Debian; see $(rel "$APT_LOG")"
        fi
        BB_DEB="$DEBS/$(deb_name "$BUSYBOX_PKG" "$bb_ver")"
    else
        say "      cached: $(rel "$BB_DEB")"
    fi
fi
BB_VERSION="$(dpkg-deb -f "$BB_DEB" Version)"

# ---- 3. extract --------------------------------------------------------------
step 3 "extracting kernel $KERNEL_ABI ($KERNEL_VERSION) and busybox $BB_VERSION"
KDIR="$CACHE/extract/${KERNEL_PKG}_${KERNEL_VERSION}"
BBDIR="$CACHE/extract/${BUSYBOX_PKG}_${BB_VERSION//:/%3a}"
mkdir -p "$CACHE/extract"
if ! [ "$KDIR/.extracted" -nt "$KERNEL_DEB" ]; then
    mdir="./lib/modules/$KERNEL_ABI"
    deb_extract "$KERNEL_DEB" "$KDIR" './boot/*' \
        "$mdir/kernel/drivers/virtio/*" "$mdir/kernel/drivers/block/*" "$mdir/modules.builtin"
fi
if ! [ "$BBDIR/.extracted" -nt "$BB_DEB" ]; then
    deb_extract "$BB_DEB" "$BBDIR" './bin/busybox'
fi
VMLINUZ="$KDIR/boot/vmlinuz-$KERNEL_ABI"
KCONFIG="$KDIR/boot/config-$KERNEL_ABI"
BUSYBOX="$BBDIR/bin/busybox"
[ -f "$VMLINUZ" ] || die "$KERNEL_PKG has no boot/vmlinuz-$KERNEL_ABI (KERNEL_ABI wrong?)"
[ -x "$BUSYBOX" ] || die "$BUSYBOX_PKG has no bin/busybox"
# A static binary has no ELF interpreter path in it.
if grep -aq '/lib64/ld-linux' "$BUSYBOX"; then die "$BUSYBOX is not statically linked"; fi
"$BUSYBOX" true 2>/dev/null || die "cannot run $BUSYBOX on this host (need an amd64 host)"
mapfile -t BB_APPLETS < <("$BUSYBOX" --list-full)
[ "${#BB_APPLETS[@]}" -gt 50 ] || die "busybox --list-full returned too few applets"

# ---- 4. initramfs ------------------------------------------------------------
step 4 "building initramfs (uncompressed newc cpio)"
STAGE="$CACHE/stage"
rm -rf "$STAGE"
IRD="$STAGE/initrd"
mkdir -p "$IRD"/{bin,dev,proc,sys,newroot,lib/modules}
install -m 0755 "$BUSYBOX" "$IRD/bin/busybox"
for a in sh mount umount insmod sleep usleep cat switch_root setsid cttyhack findfs; do
    ln -s busybox "$IRD/bin/$a"
done

MODSRC="$KDIR/lib/modules/$KERNEL_ABI/kernel/drivers"
loaded=" "
MODNOTES=()
for m in "${INITRD_MODULES[@]}"; do
    src="$(find "$MODSRC" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) -print -quit)"
    if [ -z "$src" ]; then
        cfg="CONFIG_${m^^}"
        [ "$m" = virtio_ring ] && cfg=CONFIG_VIRTIO
        if grep -q "^$cfg=y" "$KCONFIG" 2>/dev/null; then
            MODNOTES+=("$m: built in ($cfg=y)"); loaded+="$m "; continue
        fi
        die "module $m not found under $(rel "$MODSRC")"
    fi
    dst="$IRD/lib/modules/$m.ko"
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) ensure_tools xz; xz -dc "$src" >"$dst"; MODNOTES+=("$m: decompressed from .ko.xz") ;;
        *.ko.zst) ensure_tools zstd; zstd -qdc "$src" >"$dst"; MODNOTES+=("$m: decompressed from .ko.zst") ;;
        *.ko.gz) ensure_tools gzip; gzip -dc "$src" >"$dst"; MODNOTES+=("$m: decompressed from .ko.gz") ;;
    esac
    vm="$(ko_field "$dst" vermagic)"
    case "$vm" in "$KERNEL_ABI "*) ;; *) die "$m.ko vermagic '$vm' does not match $KERNEL_ABI" ;; esac
    deps="$(ko_field "$dst" depends)"
    for d in ${deps//,/ }; do
        case "$loaded" in *" $d "*) ;; *) die "$m needs module $d, which is not loaded before it" ;; esac
    done
    loaded+="$m "
done

cat >"$IRD/init" <<'EOF'
#!/bin/sh
# initramfs /init: load virtio modules, mount the root disk, switch_root.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

fail() {
    echo "initramfs: FAILED: $*"
    while :; do setsid cttyhack sh; sleep 1; done
}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"

root=/dev/vda mode=rw fstype=ext4 init=/sbin/init
set -f
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        rootfstype=*) fstype="${arg#rootfstype=}" ;;
        init=*) init="${arg#init=}" ;;
        rw) mode=rw ;;
        ro) mode=ro ;;
    esac
done
set +f

echo "initramfs: loading virtio modules"
for m in virtio virtio_ring virtio_mmio virtio_blk; do
    [ -e "/lib/modules/$m.ko" ] || continue
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done

# Wait up to 60 s (300 x 0.2 s) for the root device.
dev="$root" n=0
while :; do
    case "$root" in
        LABEL=*|UUID=*|PARTUUID=*) dev="$(findfs "$root" 2>/dev/null)" || dev= ;;
    esac
    [ -n "$dev" ] && [ -b "$dev" ] && break
    n=$((n + 1))
    [ "$n" -gt 300 ] && fail "root device $root did not appear within 60 s"
    usleep 200000
done

mount -t "$fstype" -o "$mode" "$dev" /newroot || fail "mount $dev ($fstype, $mode) on /newroot"
[ -x "/newroot$init" ] || [ -L "/newroot$init" ] || fail "no $init on $dev"
for d in dev proc sys; do
    if [ -d "/newroot/$d" ]; then mount -o move "/$d" "/newroot/$d"; else umount -l "/$d"; fi
done
exec switch_root /newroot "$init"
echo "initramfs: FAILED: switch_root /newroot $init"
while :; do setsid cttyhack sh; sleep 1; done
EOF
chmod 0755 "$IRD/init"
# A syscall-free PID 1 for kernel-only guests (see spin-init.S).
as --64 -o "$STAGE/spin-init.o" "$HERE/spin-init.S"
ld -static -nostdlib -o "$IRD/spin-init" "$STAGE/spin-init.o"
if [ "$(id -u)" = 0 ]; then
    mknod -m 0600 "$IRD/dev/console" c 5 1   # kernel's initial stdio
fi

cpio_pack() {  # cpio_pack DIR OUTFILE
    (cd "$1" && find . -mindepth 1 | sed 's|^\./||' | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) >"$2.tmp"
    mv "$2.tmp" "$2"
}
cpio_pack "$IRD" "$STAGE/initrd.img"

# ---- 5. root filesystem and disk images ---------------------------------------
step 5 "building ext4 root filesystem (${ROOTFS_SIZE_MIB} MiB) and MBR disk"
ROOT="$STAGE/rootfs"
mkdir -p "$ROOT"/{bin,sbin,boot,etc,proc,sys,dev,tmp,root,mnt,var,run}
chmod 1777 "$ROOT/tmp"
chmod 0700 "$ROOT/root"
cp "$VMLINUZ" "$ROOT/boot/vmlinuz-$KERNEL_ABI"
cp "$STAGE/initrd.img" "$ROOT/boot/initrd.img-$KERNEL_ABI"
[ -f "$KCONFIG" ] && cp "$KCONFIG" "$ROOT/boot/config-$KERNEL_ABI"
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
# A getpid() loop for the hot-system-call live-patch test (see getpid-loop.S).
as --64 -o "$STAGE/getpid-loop.o" "$HERE/getpid-loop.S"
ld -static -nostdlib -o "$ROOT/bin/getpid-loop" "$STAGE/getpid-loop.o"
for a in "${BB_APPLETS[@]}"; do
    name="${a##*/}"
    case "$a" in
        bin/*|usr/bin/*) dir=bin ;;
        sbin/*|usr/sbin/*) dir=sbin ;;
        *) continue ;;   # e.g. /linuxrc
    esac
    case "$name" in busybox|init|poweroff|reboot|halt) continue ;; esac
    [ -e "$ROOT/$dir/$name" ] || ln -s ../bin/busybox "$ROOT/$dir/$name"
done
# Our PID 1 is a shell script, not an init daemon: make the power applets
# act at once (-f). Scripts for callers using a path; shell functions for the
# interactive shell, because this busybox's ash runs applets before $PATH.
for a in poweroff reboot halt; do
    printf '#!/bin/sh\nsync\nexec /bin/busybox %s -f "$@"\n' "$a" >"$ROOT/sbin/$a"
    chmod 0755 "$ROOT/sbin/$a"
done

printf '%s\n' "$GUEST_HOSTNAME" >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$GUEST_HOSTNAME" >"$ROOT/etc/hosts"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
printf '/dev/root / ext4 rw 0 1\n' >"$ROOT/etc/fstab"
cat >"$ROOT/etc/shrc" <<'EOF'
# Sourced by interactive shells ($ENV). No init daemon runs: power off at once.
poweroff() { sync; /bin/busybox poweroff -f "$@"; }
reboot() { sync; /bin/busybox reboot -f "$@"; }
halt() { sync; /bin/busybox halt -f "$@"; }
EOF
cat >"$ROOT/etc/profile" <<'EOF'
export PATH=/sbin:/bin HOME=/root PS1='guest# ' ENV=/etc/shrc
. /etc/shrc
EOF

cat >"$ROOT/sbin/init" <<'EOF'
#!/bin/sh
# PID 1 of the guest: mount the API filesystems, announce readiness, and keep
# a root shell on the console (respawned if it exits).
export PATH=/sbin:/bin HOME=/root TERM=linux PS1='guest# ' ENV=/etc/shrc
mounted() { grep -q " $1 " /proc/mounts 2>/dev/null; }
[ -e /proc/self ] || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
hostname -F /etc/hostname 2>/dev/null || hostname guest
# A serial console reports a 0x0 window, so the shell's line editor would wrap
# (and redraw) at 80 columns, garbling long command lines sent by a host.
case "$(stty size 2>/dev/null)" in ""|"0 0") stty rows 25 cols 1024 2>/dev/null ;; esac
cd /root
echo VMM-GUEST-READY
while :; do
    setsid cttyhack /bin/sh
    sleep 1
done
EOF
chmod 0755 "$ROOT/sbin/init"

IMG_TMP="$STAGE/guest.img"
rm -f "$IMG_TMP"
truncate -s "${ROOTFS_SIZE_MIB}M" "$IMG_TMP"
mkfs.ext4 -F -q -L guestroot -E root_owner=0:0 -d "$ROOT" "$IMG_TMP" "${ROOTFS_SIZE_MIB}M" \
    || die "mkfs.ext4 failed"

# MBR disk: 1 MiB gap (partition starts at sector 2048), then the filesystem.
MBR_TMP="$STAGE/guest-mbr.img"
rm -f "$MBR_TMP"
truncate -s "$((ROOTFS_SIZE_MIB + 1))M" "$MBR_TMP"
printf 'label: dos\nlabel-id: 0x67756573\nstart=2048, size=%d, type=83\n' "$((ROOTFS_SIZE_MIB * 2048))" \
    | sfdisk -q --no-reread --no-tell-kernel "$MBR_TMP" >/dev/null \
    || die "sfdisk failed"
dd if="$IMG_TMP" of="$MBR_TMP" bs=1M seek=1 conv=notrunc,sparse status=none

cp "$VMLINUZ" "$STAGE/vmlinuz"
{
    printf 'config=%s\n' "$CONFIG_KEY"
    printf 'kernel_package=%s\nkernel_version=%s\nkernel_abi=%s\n' "$KERNEL_PKG" "$KERNEL_VERSION" "$KERNEL_ABI"
    printf 'kernel_deb=%s\n' "$(basename "$KERNEL_DEB")"
    printf 'busybox_package=%s\nbusybox_version=%s\nbusybox_deb=%s\n' "$BUSYBOX_PKG" "$BB_VERSION" "$(basename "$BB_DEB")"
    printf 'initrd_modules=%s\n' "${INITRD_MODULES[*]}"
    for n in "${MODNOTES[@]+"${MODNOTES[@]}"}"; do printf 'module_note=%s\n' "$n"; done
    printf 'rootfs_size_mib=%s\n' "$ROOTFS_SIZE_MIB"
} >"$STAGE/build-info.txt"

for f in vmlinuz initrd.img guest.img guest-mbr.img build-info.txt; do
    mv -f "$STAGE/$f" "$OUT/$f"
done
rm -rf "$STAGE"

say "built $(rel "$OUT")/: vmlinuz ($(stat -c %s "$OUT/vmlinuz") B), initrd.img ($(stat -c %s "$OUT/initrd.img") B), guest.img, guest-mbr.img"
say "guest image ready: $(rel "$OUT/guest.img")"
