#!/usr/bin/env bash
# The checked lanes beside the release suite (scripts/test.sh), run by CI:
#  1. a debug build with AddressSanitizer — Swift's bounds, overflow and exclusivity checks on,
#     ASan on the host, the Swift plugins and the C plugins the tests compile (the example and
#     failure fixtures) — running the plugin-loading, registry, checkpoint, config, memory and
#     run-directory tests, and the register-tile attention kernels (C) against the reference;
#  2. every fuzz target (scripts/fuzz.sh) for FUZZ_SECONDS (default 30) each.
# Call scripts/setup.sh first (scripts/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
export ASAN_OPTIONS=detect_leaks=0:handle_segv=0:allow_user_segv_handler=1 SWIFT_BACKTRACE=enable=no
export VQMOE_TEST_CC=clang VQMOE_TEST_CFLAGS="-fsanitize=address -fno-omit-frame-pointer"

echo "== debug + AddressSanitizer lane"
swift build --sanitize=address --build-tests --scratch-path .build/asan 2>&1 | grep -E "error|warning: unre|Compiling|Build" | tail -n 3
swift test --sanitize=address --scratch-path .build/asan --skip-build --disable-swift-testing --filter \
  'RegistryTests|LoaderTests|MemoryBudgetTests|TrainingTests.testConfigErrors|TrainingTests.testCheckpointRoundTrip|TrainingTests.testMetricsLog|TrainingTests.testResumeRefusesUnpaired|RunDirectoryTests.testFreshRun|RunDirectoryTests.testResumePast|RunDirectoryTests.testSecondProcess|RunDirectoryTests.testNonFinite|RunDirectoryTests.testCrash|CLITests.testSweepTable|CLITests.testThirdPartyCPlugin|HyperparameterTests|FlashAttentionTests.testHeadSizes|FlashAttentionTests.testThreadCountChangesNoBits' \
  2>&1 | grep -E "error:|ERROR: AddressSanitizer|SUMMARY: AddressSanitizer|Executed .* tests" | tail -n 20
test "${PIPESTATUS[0]}" -eq 0

echo "== fuzzing"
scripts/fuzz.sh all "${FUZZ_SECONDS:-30}"
