#!/bin/sh
# Stage and build the Debian package:
#   deb/build.sh VERSION BINARY_DIR BENCH_DIR PAM_PROFILE OUT_DIR
# BINARY_DIR is the PyInstaller onedir tree, BENCH_DIR holds gen, nop and
# floor, PAM_PROFILE is the pam-auth-update profile esr.pam makes for /usr/bin/esr.
set -eu
version=$1 binary=$2 bench=$3 profile=$4 out=$5
here=$(cd "$(dirname "$0")" && pwd)
pkg=$out/esr_${version}_amd64
rm -rf "$pkg"
mkdir -p "$pkg/DEBIAN" "$pkg/usr/lib" "$pkg/usr/bin" "$pkg/lib/systemd/system" \
	"$pkg/etc/esr" "$pkg/usr/share/pam-configs" "$pkg/usr/share/man/man1" \
	"$pkg/usr/share/doc/esr" "$pkg/usr/lib/esr/bench"

cp -a "$binary" "$pkg/usr/lib/esr.tmp"
mv "$pkg/usr/lib/esr.tmp"/* "$pkg/usr/lib/esr/"
rmdir "$pkg/usr/lib/esr.tmp"
ln -s ../lib/esr/esr "$pkg/usr/bin/esr"
install -s -m 0755 "$bench/gen" "$bench/nop" "$bench/floor" "$pkg/usr/lib/esr/bench/"
# Libraries are not programs.
find "$pkg/usr/lib/esr" -name '*.so*' -type f -exec chmod 0644 {} +
# The bcc peer, and the shared header its BPF program includes, placed as in
# a checkout (bench/bcc/ and bpf/), where the peer looks for it.
install -d "$pkg/usr/lib/esr/bench/bcc" "$pkg/usr/lib/esr/bpf"
install -m 0644 "$here"/../bench/bcc/*.py "$here"/../bench/bcc/*.c "$pkg/usr/lib/esr/bench/bcc/"
install -m 0644 "$here/../bpf/esr_events.h" "$pkg/usr/lib/esr/bpf/"

install -m 0644 "$here/esr.service" "$here/esr-ui.service" "$pkg/lib/systemd/system/"
install -m 0644 "$here/esr.yaml" "$pkg/etc/esr/esr.yaml"
install -m 0644 "$profile" "$pkg/usr/share/pam-configs/esr"
sed "s/@VERSION@/$version/" "$here/esr.1" | gzip -9n > "$pkg/usr/share/man/man1/esr.1.gz"
install -m 0644 "$here/copyright" "$pkg/usr/share/doc/esr/copyright"
# The version is esr/__init__.py's; the changelog's newest entry must say so.
head -1 "$here/changelog" | grep -q "^esr ($version) " ||
	{ echo "deb/changelog: the newest entry is not esr ($version)" >&2; exit 1; }
gzip -9n < "$here/changelog" > "$pkg/usr/share/doc/esr/changelog.gz"
install -d "$pkg/usr/share/lintian/overrides"
install -m 0644 "$here/lintian-overrides" "$pkg/usr/share/lintian/overrides/esr"

install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$pkg/DEBIAN/"
echo /etc/esr/esr.yaml > "$pkg/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" "$here/control" > "$pkg/DEBIAN/control"
find "$pkg" -type d -exec chmod go-w {} +
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$out/esr_${version}_amd64.deb" >/dev/null
rm -rf "$pkg"
echo "$out/esr_${version}_amd64.deb"
