#!/usr/bin/env bash
# Retrain the router on your own labeled data, check it, and promote it.
#
#   examples/retrain_router.sh TRAIN.jsonl VAL.jsonl
#
# TRAIN / VAL: JSON Lines (or CSV) with a "text" field (a user question) and a "label" field
# (exactly one of your expert names, e.g. finance | engineering | product). The labels must be
# the [[experts]] names of the config you serve, or the orchestrator refuses the router
# (RouterMismatch). No labeled data yet? Build it from the experts' own training
# instructions (see make_labeled below; e.g. `make_labeled finance=fin.jsonl legal=legal.jsonl`).
#
# Environment (all optional):
#   STORE    router store to add the new version to (default: $EXPERTMIX_HOME/routers, the
#            store Router.load() reads, so a promoted version is used by every config whose
#            [router] has no path)
#   OOD, OOD_VAL  off-topic questions ({"text": ...}) to fit / check the abstain rule
#            (default: the project's shared routing/ood_{train,val}.jsonl when present)
set -euo pipefail

TRAIN=${1:?usage: $0 TRAIN.jsonl VAL.jsonl}
VAL=${2:?usage: $0 TRAIN.jsonl VAL.jsonl}
REPO=$(cd "$(dirname "$0")/.." && pwd)
# The project's virtualenv (made by `make demo` / `make install`) when it is not already active.
if ! command -v expertmix > /dev/null && [ -x "$REPO/.venv/bin/expertmix" ]; then
  PATH="$REPO/.venv/bin:$PATH"
fi
command -v expertmix > /dev/null || { echo "expertmix not found: run 'make install' in $REPO first" >&2; exit 1; }
HOME_DIR=${EXPERTMIX_HOME:-$(python -c 'from expertmix.io import expertmix_home; print(expertmix_home())')}
STORE=${STORE:-$HOME_DIR/routers}
SHARED=${EXPERTMIX_SHARED_DATA:-$REPO/../shared/data}
OOD=${OOD:-$SHARED/routing/ood_train.jsonl}
OOD_VAL=${OOD_VAL:-$SHARED/routing/ood_val.jsonl}

# make_labeled NAME=INSTRUCTIONS.jsonl ... > out.jsonl : {"text": instruction, "label": NAME} rows
make_labeled() {
  python - "$@" <<'PY'
import json, sys
for arg in sys.argv[1:]:
    label, path = arg.split("=", 1)
    for line in open(path, encoding="utf-8"):
        if line.strip():
            print(json.dumps({"text": json.loads(line)["instruction"], "label": label}))
PY
}

OOD_ARGS=()
[ -f "$OOD" ] && OOD_ARGS+=(--ood "$OOD")
[ -f "$OOD_VAL" ] && OOD_ARGS+=(--ood-val "$OOD_VAL")
EVAL_OOD=()
[ -f "$OOD_VAL" ] && EVAL_OOD=(--ood "$OOD_VAL")

# 1. Train: writes the next version (v0001, v0002, ...) into the store. The first version of
#    a new store becomes current at once; later ones wait for step 3.
expertmix router train "$TRAIN" --val "$VAL" "${OOD_ARGS[@]}" --out "$STORE"
NEW=$(ls "$STORE" | grep -E '^v[0-9]{4}$' | sort | tail -n 1)

# 2. Check it: accuracy, macro-F1, calibration (ECE), OOD recall, confusion matrix; spot-check.
expertmix router eval "$VAL" --router "$STORE/$NEW" "${EVAL_OOD[@]}" --report "$STORE/$NEW/eval"
expertmix route --router "$STORE/$NEW" --k 2 "How do I reverse a list in Python?"
expertmix router versions --store "$STORE"

# 3. Promote: atomic; refused if the new version scores a lower macro-F1 than the current one
#    on the same data (--force overrides). Rolling back = promoting the older version again.
expertmix router promote "$NEW" --store "$STORE" --data "$VAL"

# Serving processes load the router at start-up: restart `expertmix serve` to pick it up.
# A config can also pin a version: [router] path = "<store>/v0002" (or the store = its CURRENT).
