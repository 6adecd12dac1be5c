#!/usr/bin/env bash
# The whole test suite on real components: installs what is missing, runs ruff, mypy and import-linter, then pytest.
# Extra arguments go to pytest (for example: hack/test.sh tests/unit -x).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
# The cluster tests need the image of the shipped Dockerfile: built while Go builds the control plane.
case " ${*:-tests} " in
  *" tests "* | *" tests/ "* | *tests/cluster*) hack/install-deps.sh --with-image ;;
  *) hack/install-deps.sh ;;
esac

# The code's own rules, before any test: lint, types, import layers (pyproject.toml configures all three).
static_check() {
  local name=$1 t0=$SECONDS status=0
  shift
  echo "== [test] $name"
  "$@" || status=$?
  echo "== [test] $name: $((SECONDS - t0))s (exit $status)"
  return $status
}
static_check ruff python3 -m ruff check api agent operator tests bench hack
static_check mypy python3 -m mypy
static_check import-linter env PYTHONPATH=api:agent:operator lint-imports --no-logo

rm -f .cache/figures/*.json

t0=$SECONDS
echo "== [test] pytest"
status=0
python3 -m pytest -p no:cacheprovider -ra --durations=15 "${@:-tests}" || status=$?
echo "== [test] pytest: $((SECONDS - t0))s (exit $status)"
for figures in .cache/figures/*.json; do
  if [ -f "$figures" ]; then echo "== [test] figures from $figures:"; cat "$figures"; fi
done
exit $status
