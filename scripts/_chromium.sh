# Sourced by scripts/check: the dashboard's browser test drives a real headless Chromium,
# Debian's package (never a browser that Playwright downloads).  Sets STREAMSAGA_CHROMIUM:
#   1. as given, when it is set;
#   2. else /usr/bin/chromium, when the machine has it;
#   3. else a Chromium unpacked into .cache/chromium/ without root: apt-get (with lists of
#      its own) downloads Debian's chromium and whichever of its libraries the machine
#      lacks, dpkg-deb unpacks them, and a wrapper runs the browser on those libraries.
#      Done once; delete .cache/chromium/ to fetch it again.
if [ -n "${STREAMSAGA_CHROMIUM:-}" ]; then
  if [ ! -x "$STREAMSAGA_CHROMIUM" ]; then
    echo "STREAMSAGA_CHROMIUM=$STREAMSAGA_CHROMIUM is not an executable file" >&2
    exit 1
  fi
elif [ -x /usr/bin/chromium ]; then
  export STREAMSAGA_CHROMIUM=/usr/bin/chromium
else
  cache="$PWD/.cache/chromium"
  if [ ! -x "$cache/chromium" ]; then
    if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
      cat >&2 <<'MSG'
The dashboard's browser test needs Chromium.  On Debian scripts/check fetches Debian's
package by itself (no root needed); this machine has no apt-get.  Set
STREAMSAGA_CHROMIUM to a Chromium or Chrome binary you have, then run this again.
MSG
      exit 1
    fi
    echo "== fetching Debian's chromium into .cache/chromium (once; no root needed)"
    work="$cache.partial"
    rm -rf "$work"
    mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/debs" "$work/root"
    apt=(apt-get -q -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work" -o Debug::NoLocking=1)
    "${apt[@]}" update >/dev/null
    # what installing it would add to this machine: chromium and the libraries it lacks
    mapfile -t packages < <("${apt[@]}" -s --no-install-recommends install chromium | awk '/^Inst /{print $2}')
    if [ "${#packages[@]}" -eq 0 ]; then
      echo "apt-get found no chromium package to fetch (Ubuntu ships it as a snap);" \
        "set STREAMSAGA_CHROMIUM to a Chromium or Chrome binary you have, then run this again" >&2
      exit 1
    fi
    (cd "$work/debs" && "${apt[@]}" download "${packages[@]}" >/dev/null)
    for deb in "$work"/debs/*.deb; do
      dpkg-deb -x "$deb" "$work/root"
    done
    rm -rf "$work/root/usr/share/doc" "$work/root/usr/share/man"
    libs=$(find "$work/root" \( -name '*.so' -o -name '*.so.[0-9]*' \) -printf '%h\n' | sort -u | sed "s|^$work|$cache|" | paste -sd: -)
    cat >"$work/chromium" <<WRAPPER
#!/bin/sh
# Debian's chromium unpacked by scripts/_chromium.sh, on the libraries unpacked beside it.
LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$cache/root/usr/lib/chromium/chromium" "\$@"
WRAPPER
    chmod +x "$work/chromium"
    rm -rf "$work/lists" "$work/archives" "$work/debs" "$work"/*.bin
    rm -rf "$cache"
    mv "$work" "$cache"
  fi
  export STREAMSAGA_CHROMIUM="$cache/chromium"
fi
