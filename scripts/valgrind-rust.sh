#!/usr/bin/env bash
# Runs the Rust test binaries under valgrind memcheck; fails on any memory error or definite leak.
# The header fuzzer runs 300 cases here (100,000 natively).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t bins < <(cargo test --no-run --message-format=json --quiet 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
for b in "${bins[@]}"; do
  echo "valgrind: $(basename "$b")"
  PROPTEST_CASES=300 valgrind --quiet --error-exitcode=99 --leak-check=full \
    --errors-for-leak-kinds=definite --show-leak-kinds=definite --trace-children=no "$b" --test-threads=2 -q >/dev/null
done
echo "valgrind: Rust tests clean (${#bins[@]} binaries)"
