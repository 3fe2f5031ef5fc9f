#!/usr/bin/env bash
# Install orproxy as a systemd service that runs the program from your venv: --venv DIR,
# else $VIRTUAL_ENV, else ./.venv, else a new ./.venv. The work is service_install.sh's;
# see there, or run with --help.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
exec "$here/service_install.sh" --from-venv "$@"
