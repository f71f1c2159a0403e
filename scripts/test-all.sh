#!/usr/bin/env bash
# Runs every test of zcbuf: Rust (unit, integration, header drift, header fuzzing, doc tests),
# the C example (-Wall -Werror) natively and under valgrind, the Rust tests under valgrind,
# the Python package (pytest, including cross-process, crash and small-/dev/shm tests) and a
# Python smoke run under valgrind. Installs the Python package and its test extras first.
#   bash scripts/test-all.sh            # everything
#   ZCBUF_SKIP_VALGRIND=1 bash scripts/test-all.sh   # without the (slow) valgrind runs
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n=== %s\n' "$*"; }

step "python package + test extras (pip install '.[test]')"
python3 -m pip install --quiet --disable-pip-version-check '.[test]'

step "cargo test (unit, integration, header drift, fuzzing, doc tests)"
cargo test --all-targets --quiet
cargo test --doc --quiet

step "C example, -Wall -Wextra -Werror against include/zcbuf.h"
cargo build --release --quiet
out=$(mktemp -d)
gcc -std=c11 -Wall -Wextra -Werror -Iinclude examples/c_roundtrip.c -Ltarget/release -lzcbuf -o "$out/c_roundtrip"
LD_LIBRARY_PATH=target/release "$out/c_roundtrip"

if [[ -z "${ZCBUF_SKIP_VALGRIND:-}" ]]; then
  step "valgrind memcheck: the C example"
  LD_LIBRARY_PATH=target/release valgrind --quiet --error-exitcode=99 --leak-check=full \
    --errors-for-leak-kinds=definite --show-leak-kinds=definite "$out/c_roundtrip" >/dev/null
  echo "valgrind: C example clean"

  step "valgrind memcheck: the Rust tests"
  bash scripts/valgrind-rust.sh

  step "valgrind memcheck: a Python smoke run"
  bash scripts/valgrind-python.sh
fi

step "pytest (soak: ${ZCBUF_SOAK_SECONDS:=60} s; set ZCBUF_SOAK_SECONDS to change)"
export ZCBUF_SOAK_SECONDS
python3 -m pytest -q tests/python
