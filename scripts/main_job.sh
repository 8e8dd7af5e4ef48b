#!/usr/bin/env bash
# The main job: train LoFlexMDM on star-easy, then test the checkpoint that run produced.
#
#   scripts/main_job.sh [CONFIG] [extra fit options ...]
#
# CONFIG defaults to configs/star/cpu/easy_loflexmdm_early.yaml, the 2-core CPU recipe (two DDP processes, about
# 25 minutes of fit and test, testing with 500 sampler steps; configs/star/easy_loflexmdm.yaml is the larger, GPU-sized run). Extra options (e.g. --trainer.max_steps 100) go to fit;
# test reads them back from the config.yaml that fit saved. Each run gets its own log directory <save_dir>/<name>/main-<timestamp>/, so the test always loads
# the last.ckpt of the fit that just finished (`--ckpt_path last` would not find it from a new process).
set -euo pipefail

config="configs/star/cpu/easy_loflexmdm_early.yaml"
if [[ $# -gt 0 && "$1" != --* ]]; then
  config="$1"
  shift
fi
version="main-$(date +%Y%m%d-%H%M%S)"
cli=(python -m insertion_diffusion)

"${cli[@]}" fit --config "$config" --trainer.logger.init_args.version "$version" "$@"

# the log directory of this run, read back from the resolved configuration
log_dir=$("${cli[@]}" fit --config "$config" --trainer.logger.init_args.version "$version" "$@" --print_config \
  | python -c 'import sys, yaml; a = yaml.safe_load(sys.stdin)["trainer"]["logger"]["init_args"]; print("/".join(str(a[k]) for k in ("save_dir", "name", "version")))')
ckpt="$log_dir/checkpoints/last.ckpt"
if [[ ! -f "$ckpt" ]]; then
  echo "main_job: expected checkpoint $ckpt was not written" >&2
  exit 1
fi
cp "$log_dir/config.yaml" "$log_dir/fit_config.yaml"  # the test run below rewrites config.yaml

# The test runs in one process even when fit used several: a distributed sampler would pad the test set with
# repeated graphs whenever it does not split evenly, and one process needs no rendezvous.
"${cli[@]}" test --config "$log_dir/fit_config.yaml" --ckpt_path "$ckpt" --trainer.enable_progress_bar false \
  --trainer.devices 1 --trainer.num_nodes 1 --trainer.strategy auto 2>&1 | tee "$log_dir/test.log"

python - "$log_dir" <<'PY'
import re, sys
text = open(f"{sys.argv[1]}/test.log").read()
found = re.search(r"test/exact_match\s+([0-9.eE+-]+)", text)
if not found:
    sys.exit("main_job: test/exact_match not found in the test output")
print(f"\nstar test exact match: {float(found.group(1)):.4f}   (log dir: {sys.argv[1]})")
PY
