#!/usr/bin/env bash
# The whole test suite on real components: installs what is missing, then runs pytest.
# Extra arguments go to pytest (for example: hack/test.sh tests/unit -x).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
hack/install-deps.sh
t0=$SECONDS
echo "== [test] pytest"
status=0
python3 -m pytest -p no:cacheprovider -ra "${@:-tests}" || status=$?
echo "== [test] pytest: $((SECONDS - t0))s (exit $status)"
exit $status
