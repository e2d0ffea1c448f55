#!/usr/bin/env bash
# Fuzz one of the host's input readers with libFuzzer (+ AddressSanitizer, Swift's checks on).
#
# usage: scripts/fuzz.sh TARGET|all [SECONDS]    TARGET: config, set, registry, safetensors
#
# Builds .build/fuzz/vqmoe-fuzz once (the VQMoE module's sources and Tests/Fuzz/FuzzTargets.swift,
# compiled by swiftc -sanitize=fuzzer,address), then runs TARGET for SECONDS (default 30) from
# its seed corpus Tests/Fuzz/corpus/TARGET (new inputs go to .build/fuzz/corpus/TARGET). A crash
# leaves .build/fuzz/crash-* and fails; turn it into a regression test, then fix it.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/fuzz.sh TARGET|all [SECONDS]}
seconds=${2:-30}
bin=.build/fuzz/vqmoe-fuzz
mkdir -p .build/fuzz
newest=$(find Sources/VQMoE Sources/VQMoEABI Tests/Fuzz/FuzzTargets.swift -newer "$bin" -type f 2>/dev/null | head -n 1 || true)
if [ ! -x "$bin" ] || [ -n "$newest" ]; then
  echo "== building $bin"
  clang -c -fPIC -fsanitize=fuzzer-no-link,address -ISources/VQMoEABI/include Sources/VQMoEABI/abi.c \
    -o .build/fuzz/abi.o
  swiftc -sanitize=fuzzer,address -parse-as-library -module-name VQMoE -O -g \
    -ISources/VQMoEABI/include -ISources/CBLAS -ISources/CFFI \
    $(find Sources/VQMoE -name '*.swift' | sort) Tests/Fuzz/FuzzTargets.swift .build/fuzz/abi.o \
    -lopenblas -lffi -o "$bin" 2> >(grep -v "Cannot export local symbol" >&2)
fi
targets=("$target"); [ "$target" = all ] && targets=(config set registry safetensors)
export ASAN_OPTIONS=detect_leaks=0 SWIFT_BACKTRACE=enable=no
for t in "${targets[@]}"; do
  [ -d "Tests/Fuzz/corpus/$t" ] || { echo "unknown fuzz target '$t' (config, set, registry, safetensors)" >&2; exit 2; }
  mkdir -p ".build/fuzz/corpus/$t"
  echo "== fuzz $t for ${seconds}s"
  VQMOE_FUZZ_TARGET=$t "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
    -artifact_prefix=.build/fuzz/ ".build/fuzz/corpus/$t" "Tests/Fuzz/corpus/$t" 2>&1 | grep -E "^#[0-9]+.*DONE|ERROR|SUMMARY|Test unit written|stat::" || true
  if ls .build/fuzz/crash-* .build/fuzz/timeout-* .build/fuzz/oom-* > /dev/null 2>&1; then
    echo "fuzz $t: found a failing input (.build/fuzz/)" >&2; exit 1
  fi
done
