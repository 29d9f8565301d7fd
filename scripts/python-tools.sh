#!/usr/bin/env bash
# Creates (once per machine) a virtualenv with the Python tools in scripts/requirements.txt and
# prints its bin directory on the last line. Reinstalls when the requirements change.
set -euo pipefail
cd "$(dirname "$0")"

venv="${STATIC_INGRESS_VENV:-$HOME/.cache/static-ingress/venv}"
stamp="$venv/.requirements"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
if ! cmp -s requirements.txt "$stamp"; then
  echo "installing Python test tools into $venv (once per change of scripts/requirements.txt)" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r requirements.txt >&2
  cp requirements.txt "$stamp"
fi
echo "$venv/bin"
