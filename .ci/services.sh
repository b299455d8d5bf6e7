# Sourced by `./run test` (and so by CI): the services the test suite uses, on this machine.
#
#   PostgreSQL  a private server (own data folder, port 55432, loopback only, trust auth) started
#               from Debian's `postgresql` package; exports ACCELERANDO_TEST_POSTGRES_URL
#   Chromium    Debian's `chromium`, for the report's browser test; exports ACCELERANDO_TEST_CHROMIUM
#
# Missing packages are installed with apt-get when we are root (CI on a fresh machine is); as
# another user, what is missing is named and the tests that need it fail with that message.
# Idempotent and fast once set up: an installed package is not reinstalled, a running server is
# reused. ACCELERANDO_NO_SERVICES=1 skips all of this (the tests that need a service then skip).

_acc_services() {
  local root=$1 need=() pgbin="" port=${ACCELERANDO_PG_PORT:-55432}
  local data=${ACCELERANDO_PG_DATA:-/tmp/accelerando-pg-$port}
  pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$pgbin" ] && [ -x "$pgbin/initdb" ] || need+=(postgresql)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "services: installing ${need[*]} (apt-get) ..." >&2
      # a fresh machine has no package lists: update first
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || { echo "services: apt-get install ${need[*]} failed" >&2; return 1; }
      pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    else
      echo "services: not installed: ${need[*]} (apt-get install ${need[*]} as root)" >&2
      return 1
    fi
  fi
  export ACCELERANDO_TEST_CHROMIUM=${ACCELERANDO_TEST_CHROMIUM:-$(command -v chromium)}

  # PostgreSQL refuses to run as root: the server runs as the `postgres` user (the package makes
  # it) when we are root, else as ourselves
  local as=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    as=(runuser -u postgres --)
  fi
  if ! "$pgbin/pg_isready" -q -h 127.0.0.1 -p "$port" 2>/dev/null; then
    if [ ! -f "$data/PG_VERSION" ]; then
      rm -rf "$data" && mkdir -p "$data"
      [ "$(id -u)" = 0 ] && chown postgres "$data"
      # from / : the server's user may not be allowed into the caller's directory
      (cd / && "${as[@]}" "$pgbin/initdb" -D "$data" -U postgres -A trust -E UTF8 >/dev/null) \
        || { echo "services: initdb failed" >&2; return 1; }
    fi
    (cd / && "${as[@]}" "$pgbin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 30 \
      -o "-p $port -k $data -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" start >/dev/null) \
      || { echo "services: PostgreSQL did not start; see $data/server.log" >&2; return 1; }
  fi
  export ACCELERANDO_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
}

if [ -z "${ACCELERANDO_NO_SERVICES:-}" ]; then
  export ACCELERANDO_TEST_SERVICES=required
  _acc_services "$(pwd)" || echo "services: the tests that need them will fail (ACCELERANDO_NO_SERVICES=1 skips them)" >&2
fi
unset -f _acc_services
