#!/usr/bin/env bash
# Make sure the real data the main job and the tests use is reachable:
#   $VQMOE_DATA, or ../shared/data beside the checkout (the development setup), or else
#   data/enwik8-mini/enwik8-mini in the checkout, taken from its public package: the gensim
#   4.4.0 wheel on PyPI ships it as
#   gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2
# Optional: --enwik8 PATH/enwik8.zip also unpacks the full enwik8 to data/enwik8/enwik8.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
want_sha=34c1c63050c87cc8477b9ae36b1cb0edf372612c92938b742e579a7109c20fa4

if [ "${1:-}" = "--enwik8" ]; then
  [ -f "${2:-}" ] || { echo "usage: scripts/get-data.sh --enwik8 PATH/enwik8.zip" >&2; exit 64; }
  mkdir -p data/enwik8
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("enwik8", sys.argv[2])' "$2" data/enwik8
  echo "data/enwik8/enwik8 ready ($(wc -c < data/enwik8/enwik8) bytes)"
  exit 0
fi

for d in "${VQMOE_DATA:-}" "$root/../shared/data" "$root/data"; do
  if [ -n "$d" ] && [ -f "$d/enwik8-mini/enwik8-mini" ]; then
    echo "data: $d" >&2
    exit 0
  fi
done

echo "enwik8-mini not found; taking it from the gensim 4.4.0 wheel on PyPI ..." >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps gensim==4.4.0 -d "$tmp" >&2
mkdir -p data/enwik8-mini
python3 - "$tmp" "$root/data/enwik8-mini/enwik8-mini" "$want_sha" <<'PY'
import bz2, glob, hashlib, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/gensim-4.4.0-*.whl")[0]
member = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
data = bz2.decompress(zipfile.ZipFile(wheel).read(member))
digest = hashlib.sha256(data).hexdigest()
if digest != sys.argv[3]:
    sys.exit(f"unexpected content (sha256 {digest}); refusing to use it")
open(sys.argv[2], "wb").write(data)
print(f"data: wrote {sys.argv[2]} ({len(data)} bytes, sha256 verified)", file=sys.stderr)
PY
