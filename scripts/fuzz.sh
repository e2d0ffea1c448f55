#!/usr/bin/env bash
# Fuzz one of the readers of outside input with libFuzzer (+ AddressSanitizer, Swift's checks on).
#
# usage: scripts/fuzz.sh TARGET|all [SECONDS]
#   TARGET: the host's readers config, set, registry, safetensors; the dataset plugins char,
#   word, csv, sst, idx, cifar (their file readers and batches, through the host)
#
# Builds .build/fuzz/vqmoe-fuzz once (the VQMoE module's sources with Tests/Fuzz/FuzzTargets.swift,
# PluginKit, and each dataset plugin with its entry symbol renamed vqmoe_fuzz_entry_NAME, all
# compiled by swiftc -sanitize=fuzzer,address), then runs TARGET for SECONDS (default 30) from
# its seed corpus Tests/Fuzz/corpus/TARGET (new inputs go to .build/fuzz/corpus/TARGET). A crash
# leaves .build/fuzz/crash-* and fails; turn it into a regression test, then fix it. To see what
# inputs give: VQMOE_FUZZ_TARGET=TARGET VQMOE_FUZZ_VERBOSE=1 .build/fuzz/vqmoe-fuzz FILE...
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/fuzz.sh TARGET|all [SECONDS]}
seconds=${2:-30}
bin=.build/fuzz/vqmoe-fuzz
mkdir -p .build/fuzz
objs=.build/fuzz/obj
# Dataset targets and the plugin folders they link.
declare -A datasets=([char]=DatasetChar [word]=DatasetWord [csv]=DatasetCSV [sst]=DatasetSST [idx]=DatasetIDX
  [cifar]=DatasetCIFAR)
# One build at a time (several targets may be fuzzed at once); the rest wait, then reuse it.
exec 9> .build/fuzz/.build.lock
flock 9
newest=$(find Sources/VQMoE Sources/VQMoEABI Sources/CKernels Plugins/PluginKit Plugins/Dataset* Tests/Fuzz/FuzzTargets.swift \
  -newer "$bin" -type f 2>/dev/null | head -n 1 || true)
if [ ! -x "$bin" ] || [ -n "$newest" ]; then
  echo "== building $bin"
  mkdir -p "$objs"
  objcopy=$(dirname "$(readlink -f "$(command -v swiftc)")")/llvm-objcopy
  [ -x "$objcopy" ] || objcopy=objcopy
  swift_c() { # swift_c MODULE OUTPUT SOURCES...: one module, whole-module, to one object file
    local module=$1 out=$2; shift 2
    swiftc -sanitize=fuzzer,address -parse-as-library -module-name "$module" -O -g -wmo -c \
      -ISources/VQMoEABI/include -ISources/CKernels/include -ISources/CBLAS -ISources/CFFI -ISources/CZlib -I"$objs" \
      "$@" -o "$out" 2> >(grep -v "Cannot export local symbol" >&2)
  }
  clang -c -fPIC -fsanitize=fuzzer-no-link,address -ISources/VQMoEABI/include Sources/VQMoEABI/abi.c -o "$objs/abi.o"
  clang -c -O2 -fPIC -fsanitize=fuzzer-no-link,address -ISources/CKernels/include Sources/CKernels/flash_attention.c \
    -o "$objs/ckernels.o"
  swift_c PluginKit "$objs/PluginKit.o" -emit-module -emit-module-path "$objs/PluginKit.swiftmodule" \
    $(find Plugins/PluginKit -name '*.swift' | sort)
  for name in "${!datasets[@]}"; do
    plugin=${datasets[$name]}
    swift_c "$plugin" "$objs/$plugin.o" $(find "Plugins/$plugin" -name '*.swift' | sort)
    "$objcopy" --redefine-sym "vqmoe_plugin_entry=vqmoe_fuzz_entry_$name" "$objs/$plugin.o"
  done
  swift_c VQMoE "$objs/VQMoE.o" $(find Sources/VQMoE -name '*.swift' | sort) Tests/Fuzz/FuzzTargets.swift
  swiftc -sanitize=fuzzer,address "$objs"/*.o -lopenblas -lffi -lz -Xlinker --export-dynamic -o "$bin" \
    2> >(grep -v "Cannot export local symbol" >&2)
fi
flock -u 9
targets=("$target"); [ "$target" = all ] && targets=(config set registry safetensors char word csv sst idx cifar)
export ASAN_OPTIONS=detect_leaks=0 SWIFT_BACKTRACE=enable=no
for t in "${targets[@]}"; do
  [ -d "Tests/Fuzz/corpus/$t" ] || { echo "unknown fuzz target '$t' (config, set, registry, safetensors, char, word, csv, sst, idx, cifar)" >&2; exit 2; }
  mkdir -p ".build/fuzz/corpus/$t"
  echo "== fuzz $t for ${seconds}s"
  VQMOE_FUZZ_TARGET=$t "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
    -artifact_prefix=.build/fuzz/ ".build/fuzz/corpus/$t" "Tests/Fuzz/corpus/$t" 2>&1 | grep -E "^#[0-9]+.*DONE|ERROR|SUMMARY|Test unit written|stat::" || true
  if ls .build/fuzz/crash-* .build/fuzz/timeout-* .build/fuzz/oom-* > /dev/null 2>&1; then
    echo "fuzz $t: found a failing input (.build/fuzz/)" >&2; exit 1
  fi
done
