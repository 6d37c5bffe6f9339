# Sourced by scripts/check: the dashboard's browser test drives a real headless Chromium,
# Debian's package (never a browser that Playwright downloads). Installs it when missing.
chromium=${STREAMSAGA_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  if [ "$chromium" != /usr/bin/chromium ]; then
    echo "STREAMSAGA_CHROMIUM=$chromium is not an executable file" >&2
    exit 1
  fi
  as_root=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      as_root=(sudo -n)
    else
      cat >&2 <<'MSG'
The dashboard's browser test needs Chromium at /usr/bin/chromium, and installing it needs root.
Install Debian's package, then run this again:
    sudo apt-get update && sudo apt-get install -y chromium
or point STREAMSAGA_CHROMIUM at a Chromium or Chrome binary you already have.
MSG
      exit 1
    fi
  fi
  echo "== installing Debian's chromium for the browser test"
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
