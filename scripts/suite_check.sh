#!/usr/bin/env bash
# Is the test suite's green trustworthy? Runs, on this checkout:
#   1. a scan of tests/ for assertions on elapsed time (forbidden: these machines are shared and noisy);
#   2. the whole suite REPEATS times (default 3) in the usual order;
#   3. the whole suite once with its files in reverse order;
#   4. every test file alone;
# then prints one table (run, passed, failed/errors, minutes). Exit status 1 if any run failed or the
# scan found an elapsed-time assertion. Takes hours on 2 cores; run parts with ONLY=scan|repeat|reverse|alone.
#
#   scripts/suite_check.sh            # everything
#   ONLY=alone scripts/suite_check.sh # each file alone
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
REPEATS=${REPEATS:-3}
ONLY=${ONLY:-all}
OUT=$(mktemp -d /tmp/suite-check-XXXX)
declare -a ROWS
status=0

run() {  # run NAME ARGS...: one pytest invocation, its counts into ROWS
  local name=$1; shift
  local start end log=$OUT/$(echo "$name" | tr ' /' '__').log
  start=$(date +%s)
  $PY -m pytest -q "$@" > "$log" 2>&1
  local rc=$?
  end=$(date +%s)
  local summary
  summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|no tests ran|[0-9]+ error" "$log" | tail -1 | sed 's/=//g')
  local passed failed
  passed=$(echo "$summary" | grep -oE "[0-9]+ passed" | grep -oE "[0-9]+" || echo 0)
  failed=$(( $(echo "$summary" | grep -oE "[0-9]+ failed" | grep -oE "[0-9]+" || echo 0) + \
             $(echo "$summary" | grep -oE "[0-9]+ error" | grep -oE "[0-9]+" || echo 0) ))
  [ "$rc" -ne 0 ] && status=1
  ROWS+=("$(printf '| %s | %s | %s | %.1f |' "$name" "${passed:-0}" "$failed" "$(awk "BEGIN {print ($end - $start) / 60}")")")
}

if [ "$ONLY" = all ] || [ "$ONLY" = scan ]; then
  # an assert that mentions a clock or an elapsed/seconds variable
  hits=$(grep -nE "assert .*(perf_counter|monotonic|time\.time|elapsed|seconds *[<>])" tests/*.py || true)
  if [ -n "$hits" ]; then
    echo "elapsed-time assertions found:"; echo "$hits"; status=1
    ROWS+=("| scan for elapsed-time assertions | - | $(echo "$hits" | wc -l) | 0.0 |")
  else
    ROWS+=("| scan for elapsed-time assertions | none found | 0 | 0.0 |")
  fi
fi
if [ "$ONLY" = all ] || [ "$ONLY" = repeat ]; then
  for i in $(seq 1 "$REPEATS"); do run "whole suite, run $i" tests; done
fi
if [ "$ONLY" = all ] || [ "$ONLY" = reverse ]; then
  run "whole suite, files in reverse order" $(ls tests/test_*.py | sort -r)
fi
if [ "$ONLY" = all ] || [ "$ONLY" = alone ]; then
  for f in tests/test_*.py; do run "$f alone" "$f"; done
fi

echo
echo "| run | passed | failed or errors | minutes |"
echo "| --- | ---: | ---: | ---: |"
printf '%s\n' "${ROWS[@]}"
echo
echo "logs: $OUT"
exit $status
