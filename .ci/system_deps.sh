#!/usr/bin/env bash
# System and optional dependencies of the test suite, called by .ci/run inside its fresh venv
# (as root): Orthanc, a real PACS for tests/test_orthanc.py, and the project's "deploy" extra
# (MONAI Deploy App SDK) for tests/test_deploy.py. Idempotent and quiet.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/sbin/Orthanc ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get install -y -qq --no-install-recommends orthanc >/dev/null 2>&1 \
      || echo "system_deps: could not install orthanc; tests/test_orthanc.py will be skipped"
  else
    echo "system_deps: apt-get or root missing; tests/test_orthanc.py will be skipped"
  fi
fi

# torch pinned first so that the CPU wheel is used (an unpinned torch pulls a CUDA build).
if ! out=$(python -m pip install -q torch==2.13.0 -e ".[deploy]" 2>&1); then
  echo "$out" | tail -n 30
  echo "system_deps: pip install of the deploy extra failed"
  exit 1
fi
