#!/usr/bin/env bash
# The main job on the embedded default (2 CPU cores are enough), and the set-up it needs.
#   bash run.sh          set up .venv (first time only), SFT warm-up (cached in runs/sft), GRPO,
#                        then print held-out accuracy of the base and of the GRPO policy
#   bash run.sh setup    only the set-up (what .ci/run does before the tests)
# Extra arguments after the mode go to the GRPO run, e.g.  bash run.sh main --steps 100
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-main}"; shift || true
PY=.venv/bin/python

setup() {
  if [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
    echo "== set-up: python venv in .venv, packages from requirements.txt"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -r requirements.txt
    touch .venv/.installed
  fi
}

main() {
  # SFT warm-up: the base policy RL starts from (built once, then reused)
  if [ ! -f runs/sft/summary.json ]; then
    $PY npo.py --mode sft --out runs/sft --sft_steps 800 --eval_every 200 --eval_samples 0
  else
    echo "== using the cached SFT base in runs/sft (delete runs/sft to rebuild it)"
  fi
  $PY npo.py --mode grpo --model runs/sft/model --out runs/grpo --steps 300 --eval_every 50 "$@"
  $PY - <<'PY'
import json
s = json.load(open("runs/grpo/summary.json"))
print(f"\nheld-out greedy accuracy on {s['eval_n']} prompts: base (SFT) {s['eval_greedy_start']:.3f}"
      f" -> GRPO {s['eval_greedy_end']:.3f} ({100 * (s['eval_greedy_end'] - s['eval_greedy_start']):+.1f} points)")
PY
}

setup
case "$mode" in
  setup) ;;
  main) main "$@" ;;
  *) echo "usage: bash run.sh [main|setup] [grpo flags...]"; exit 2 ;;
esac
