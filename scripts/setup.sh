#!/usr/bin/env bash
# Create .venv and install segvol-label with pinned dependencies (idempotent), plus the Debian
# packages it runs with: Orthanc and its DICOMweb plugin (the archive), HAProxy (replicas), PostgreSQL (the tests
# start their own server with scripts/postgres.py), and with SEGVOL_BROWSER=1 (the tests) Chromium (they drive OHIF
# in it) and dicom3tools (dciodvfy checks every SEG).
set -euo pipefail
cd "$(dirname "$0")/.."

debs=()
command -v Orthanc >/dev/null || debs+=(orthanc)
command -v haproxy >/dev/null || debs+=(haproxy)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || debs+=(orthanc-dicomweb)
# Debian keeps initdb off PATH, in /usr/lib/postgresql/<version>/bin (scripts/postgres.py looks in both)
command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || debs+=(postgresql)
if [ "${SEGVOL_BROWSER:-0}" = 1 ]; then
  command -v chromium >/dev/null || debs+=(chromium)
  command -v dciodvfy >/dev/null || debs+=(dicom3tools)
fi
if [ ${#debs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages: ${debs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
  else
    echo "warning: not root, cannot install ${debs[*]} (sudo apt-get install ${debs[*]})" >&2
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[server,test,scale]'
.venv/bin/python -m pip install -q --no-deps monailabel==0.8.5
