#!/usr/bin/env bash
# Set up everything and start the annotator experience:
#   Orthanc (DICOMweb archive) with the sample CTs -> MONAI Label with the SegVol app on it -> OHIF.
# --local serves the sample-datastore/ folder directly instead (no archive; OHIF needs DICOMweb).
# --replicas N starts N MONAI Label processes (one per GPU where there are GPUs) behind HAProxy on
# SEGVOL_PORT, routed by image (scripts/replicas.py; docs/scaling.md).
# --conf team_db postgresql://user:password@host:5432/db puts the team store and the decoder versions in
# PostgreSQL: several hosts running this with the same URL are one team (docs/scaling.md).
# Other arguments go to MONAI Label's start_server, e.g.
#   bash scripts/serve.sh --conf weights /path/to/BAAI-SegVol     (official weights)
#   bash scripts/serve.sh --conf weights seeded                   (untrained demo weights)
# Environment: SEGVOL_HOST (127.0.0.1), SEGVOL_PORT (8000), SEGVOL_ORTHANC_PORT (8042),
# SEGVOL_STUDIES (a folder or DICOMweb URL of your own), MONAI_LABEL_DICOMWEB_USERNAME/_PASSWORD
# (Orthanc basic auth: set both and the archive is started with that user).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MONAI_LABEL_TRACKING_ENABLED=false
HOST=${SEGVOL_HOST:-127.0.0.1}
PORT=${SEGVOL_PORT:-8000}
ORTHANC_PORT=${SEGVOL_ORTHANC_PORT:-8042}
args=()
local=0
replicas=0
while [ $# -gt 0 ]; do
  case $1 in
    --local) local=1 ;;
    --replicas) replicas=${2:?--replicas needs a number}; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

if [ -n "${SEGVOL_STUDIES:-}" ]; then
  STUDIES=$SEGVOL_STUDIES
elif [ $local = 1 ] || ! command -v Orthanc >/dev/null; then
  [ $local = 1 ] || echo "Orthanc is not installed: serving the local sample-datastore/ (OHIF needs DICOMweb)" >&2
  STUDIES=sample-datastore
else
  .venv/bin/python scripts/orthanc.py start --port "$ORTHANC_PORT"
  trap '.venv/bin/python scripts/orthanc.py stop' EXIT
  .venv/bin/python scripts/orthanc.py load --port "$ORTHANC_PORT"
  STUDIES=http://127.0.0.1:$ORTHANC_PORT/dicom-web
fi

if [ "$replicas" -gt 0 ]; then
  case $STUDIES in http*) ;; *) echo "--replicas needs the DICOMweb archive (not --local)" >&2; exit 2;; esac
  .venv/bin/python scripts/replicas.py --replicas "$replicas" --studies "$STUDIES" --host "$HOST" --port "$PORT" \
    -- "${args[@]}"
  exit $?
fi
echo "segvol-label: MONAI Label on http://$HOST:$PORT (studies: $STUDIES)"
echo "  info:  http://$HOST:$PORT/info/"
case $STUDIES in http*) echo "  OHIF:  http://$HOST:$PORT/ohif/ (open a study, then the SegVol annotation mode)";; esac
env PYTHONPATH=apps/segvol .venv/bin/python -m monailabel.main start_server \
  --app apps/segvol --studies "$STUDIES" --host "$HOST" --port "$PORT" --uvicorn_app server:app "${args[@]}"
