#!/usr/bin/env bash
# Build every plugin template (Plugins/templates/<lang>/<kind>, what `vqmoe plugin new` copies)
# and every example (Plugins/examples/*) in place, as they are, and run `vqmoe plugins check` on
# each library. Needs the release build (scripts/setup.sh). Exit 1 on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.build/release
failed=0
check() { # check LIBRARY [--set ...]
  local lib=$1 log; shift
  log=/tmp/vqmoe-check-$(basename "$lib" .so)-$$.txt
  if "$bin/vqmoe" plugins check "$lib" "$@" > "$log" 2>&1; then
    echo "ok    plugins check $lib $* ($(tail -n 1 "$log"))"
  else
    echo "FAIL  plugins check $lib $*"; cat "$log"; failed=1
  fi
}
for dir in Plugins/templates/c/* Plugins/templates/swift/*; do
  kind=$(basename "$dir")
  if "$dir/build.sh" > /tmp/vqmoe-build-$$.txt 2>&1; then
    check "$dir/libmy_$kind.so"
  else
    echo "FAIL  build $dir"; cat /tmp/vqmoe-build-$$.txt; failed=1
  fi
done
# pq_c: K = k^M codes, so the checked model has n_codes = 4^2.
Plugins/examples/pq_c/build.sh > /dev/null && check Plugins/examples/pq_c/libpq_c.so --set model.n_codes=16 || failed=1
exit "$failed"
