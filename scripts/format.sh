#!/usr/bin/env bash
# Formatting and code-shape rules, one command:
#   scripts/format.sh           format in place: swift format (.swift-format) on the Swift sources,
#                               clang-format (.clang-format) on the C sources
#   scripts/format.sh --check   change nothing; fail if a file is not formatted (swift format lint
#                               --strict, clang-format --dry-run -Werror) or a function in Sources/
#                               is over 80 lines (scripts/function-lengths.py). CI runs this.
# clang-format is installed with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
swift_dirs=(Sources Plugins Tests Package.swift)
mapfile -t c_files < <(find Sources Plugins Tests -name '*.c' -o -name '*.h' | grep -v '/\.build/' | sort)

if ! command -v clang-format >/dev/null; then
  echo "installing clang-format ..." >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang-format >/dev/null
fi

if [ "${1:-}" = "--check" ]; then
  status=0
  swift format lint --strict --recursive --parallel "${swift_dirs[@]}" || { echo "swift format: run scripts/format.sh" >&2; status=1; }
  clang-format --dry-run -Werror "${c_files[@]}" || { echo "clang-format: run scripts/format.sh" >&2; status=1; }
  scripts/function-lengths.py --max 80 Sources || status=1
  [ "$status" = 0 ] && echo "format and function lengths: ok"
  exit "$status"
fi
swift format format --in-place --recursive --parallel "${swift_dirs[@]}"
clang-format -i "${c_files[@]}"
