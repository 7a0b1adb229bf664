#!/usr/bin/env bash
# perf_analyzer (Triton's load generator) on a glibc 2.36 machine (Debian 12).
#
# The `perf-analyzer` wheels are manylinux_2_38: the binary needs GLIBC_2.38 and GLIBCXX_3.4.32,
# which Debian 12 does not have. This script fetches Debian 13's libc6, libstdc++6 and libgcc-s1
# with a private apt configuration (the system's apt sources, lists and packages are untouched),
# unpacks them into DIR/root, and writes DIR/perf_analyzer: a wrapper that starts the binary
# through that newer dynamic loader with the newer libraries first on its search path (the
# system's libssl/libz are still found after them). Nothing is installed system-wide.
#
#   bash benchmarks/perf_analyzer/install.sh build/perf-analyzer
#   build/perf-analyzer/perf_analyzer -m MODEL -u 127.0.0.1:8001 -i grpc ...
set -euo pipefail
DIR=$(realpath -m "${1:-build/perf-analyzer}")
VERSION=${PERF_ANALYZER_VERSION:-2.60.0}
SUITE=${DEBIAN_SUITE:-trixie}
APT="$DIR/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/parts" "$APT/prefs" "$DIR/debs" "$DIR/wheel"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" \
  > "$APT/sources.list"
: > "$APT/status"
opts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/parts"
      -o "Dir::Etc::PreferencesParts=$APT/prefs" -o "Dir::State::Lists=$APT/lists"
      -o "Dir::State::Status=$APT/status" -o "Dir::Cache=$APT/cache" -o "Debug::NoLocking=1"
      -o "APT::Sandbox::User=root")
apt-get -q "${opts[@]}" update >/dev/null
(cd "$DIR/debs" && apt-get -q "${opts[@]}" download libc6 libstdc++6 libgcc-s1 >/dev/null)
rm -rf "$DIR/root" && mkdir -p "$DIR/root"
for deb in "$DIR"/debs/*.deb; do dpkg-deb -x "$deb" "$DIR/root"; done

python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_38_x86_64 \
  --python-version 3.11 -d "$DIR/wheel" "perf-analyzer==$VERSION"
rm -rf "$DIR/dist" && python3 -m zipfile -e "$DIR"/wheel/perf_analyzer-"$VERSION"-*.whl "$DIR/dist"
chmod +x "$DIR/dist/perf_analyzer/bin/perf_analyzer"

LIB="$DIR/root/usr/lib/x86_64-linux-gnu"
cat > "$DIR/perf_analyzer" <<WRAPPER
#!/bin/sh
# perf_analyzer $VERSION through Debian $SUITE's loader and C/C++ runtime (written by $0)
exec "$LIB/ld-linux-x86-64.so.2" --library-path "$LIB:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" \\
  "$DIR/dist/perf_analyzer/bin/perf_analyzer" "\$@"
WRAPPER
chmod +x "$DIR/perf_analyzer"
"$DIR/perf_analyzer" --version
