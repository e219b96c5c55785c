#!/usr/bin/env bash
# Set up everything and start the segvol-label MONAI Label server on the sample datastore.
# Extra arguments go to MONAI Label's start_server, e.g.
#   bash scripts/serve.sh --conf weights /path/to/BAAI-SegVol     (official weights)
#   bash scripts/serve.sh --conf weights seeded                   (untrained demo weights)
# Environment: SEGVOL_HOST (127.0.0.1), SEGVOL_PORT (8000), SEGVOL_STUDIES (sample-datastore).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MONAI_LABEL_TRACKING_ENABLED=false
HOST=${SEGVOL_HOST:-127.0.0.1}
PORT=${SEGVOL_PORT:-8000}
STUDIES=${SEGVOL_STUDIES:-sample-datastore}
echo "segvol-label: MONAI Label on http://$HOST:$PORT (info: http://$HOST:$PORT/info/, studies: $STUDIES)"
exec env PYTHONPATH=apps/segvol .venv/bin/python -m monailabel.main start_server \
  --app apps/segvol --studies "$STUDIES" --host "$HOST" --port "$PORT" --uvicorn_app server:app "$@"
