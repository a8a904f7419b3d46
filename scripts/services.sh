#!/usr/bin/env bash
# Sourced by scripts/test and scripts/chaos: makes sure PostgreSQL runs (trust auth, user
# postgres, at 127.0.0.1:5432), installs moto into a virtualenv under target/ when missing, and
# starts moto's S3 on a free loopback port for as long as the calling script runs, and installs
# the real tus clients (tuspy into the same virtualenv, tus-js-client under target/tus-js) and a
# real browser (Debian's chromium, playwright-core under target/browser-tools), and libheif's
# heif-enc and heif-convert (Debian's libheif-examples) for the HEIC tests. Exports
# MEDRELAY_TEST_DATABASE_URL, AWS_ENDPOINT_URL, the AWS_* test credentials, MEDRELAY_TEST_PYTHON,
# MEDRELAY_TUS_JS and MEDRELAY_BROWSER_TOOLS.
# Expects: the repository root as the working directory, `root` set to it, and `say`.

# --- PostgreSQL -------------------------------------------------------------------------------
export MEDRELAY_TEST_DATABASE_URL="${MEDRELAY_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ! pg_up; then
  say "PostgreSQL is down: starting it"
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
if ! pg_up; then
  echo "PostgreSQL is not reachable at 127.0.0.1:5432 and could not be started." >&2
  echo "Start it: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
  exit 1
fi
# Databases left by an interrupted earlier run.
psql -h 127.0.0.1 -U postgres -d postgres -Atqc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'medrelay_t_%'" 2>/dev/null |
  while read -r db; do psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true; done

# --- moto (S3) --------------------------------------------------------------------------------
venv="$root/target/moto-venv"
if [ ! -x "$venv/bin/moto_server" ]; then
  say "Installing moto into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]>=5.1,<6"
fi

# --- real tus clients (tuspy in the same venv, tus-js-client under target/tus-js) --------------
# Driven by crates/medrelay/tests/tus/client.{py,mjs}; the tests find them through the two exports.
if ! "$venv/bin/python" -c 'import tusclient' >/dev/null 2>&1; then
  say "Installing tuspy into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "tuspy>=1.0,<2"
fi
if ! command -v node >/dev/null 2>&1; then
  echo "node is missing (needed to run tus-js-client in the tests): install Node.js 20 and npm" >&2
  exit 1
fi
if [ ! -d "$root/target/tus-js/node_modules/tus-js-client" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "npm is missing (needed to install tus-js-client for the tests): install Node.js 20 and npm" >&2
    exit 1
  fi
  say "Installing tus-js-client into $root/target/tus-js"
  npm install --prefix "$root/target/tus-js" --no-audit --no-fund --silent tus-js-client@4
fi
# --- a real browser for the demo page's test: Debian's chromium, driven by playwright-core ------
# Installs Debian packages (as root, or through sudo); the caller checks what it needed.
apt_install() {
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  elif command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  fi
}
if [ ! -x /usr/bin/chromium ]; then
  say "Installing Debian's chromium (the demo page is tested in a real browser)"
  apt_install chromium
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "chromium is missing (the demo page's browser test needs it): apt-get install chromium" >&2
  exit 1
fi
if [ ! -d "$root/target/browser-tools/node_modules/playwright-core" ]; then
  say "Installing playwright-core into $root/target/browser-tools"
  npm install --prefix "$root/target/browser-tools" --no-audit --no-fund --silent playwright-core@1
fi
export MEDRELAY_BROWSER_TOOLS="$root/target/browser-tools/node_modules"
export MEDRELAY_TEST_PYTHON="$venv/bin/python"
export MEDRELAY_TUS_JS="$root/target/tus-js/node_modules"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
moto_log="$root/target/moto.log"
"$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$moto_log" 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  curl -fs "http://127.0.0.1:$port/moto-api/" >/dev/null 2>&1 && break
  kill -0 $moto_pid 2>/dev/null || { cat "$moto_log" >&2; echo "moto_server did not start" >&2; exit 1; }
  sleep 0.5
done
export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
export AWS_ACCESS_KEY_ID=medrelay-test AWS_SECRET_ACCESS_KEY=medrelay-test AWS_DEFAULT_REGION=us-east-1
export AWS_ALLOW_HTTP=true
# --- HEIC fixtures: libheif's heif-enc makes the test photos, heif-convert is the reference ------
if ! command -v heif-enc >/dev/null || ! command -v heif-convert >/dev/null; then
  say "Installing Debian's libheif-examples (heif-enc makes the HEIC test photos)"
  apt_install libheif-examples
fi
if ! command -v heif-enc >/dev/null || ! command -v heif-convert >/dev/null; then
  echo "heif-enc is missing (the HEIC tests make their photos with it): apt-get install libheif-examples" >&2
  exit 1
fi
