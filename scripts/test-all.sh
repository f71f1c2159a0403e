#!/usr/bin/env bash
# Runs every test of zcbuf: Rust (unit, integration, header drift, header fuzzing, doc tests),
# the C example (-Wall -Werror) natively and under valgrind, the Rust tests under valgrind,
# the Python package (pytest, including cross-process, crash and small-/dev/shm tests) and a
# Python smoke run under valgrind. Installs the Python package and its test extras first.
#   bash scripts/test-all.sh            # everything
#   ZCBUF_SKIP_VALGRIND=1 bash scripts/test-all.sh   # without the (slow) valgrind runs
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n=== %s  [%s]\n' "$*" "$(date +%T)"; }

# What this needs, said up front (CI's .ci/run installs all of it):
missing=()
for tool in cargo gcc python3; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [[ -z "${ZCBUF_SKIP_VALGRIND:-}" ]] && ! command -v valgrind >/dev/null; then
  missing+=("valgrind (or set ZCBUF_SKIP_VALGRIND=1)")
fi
if ((${#missing[@]})); then
  echo "test-all.sh needs: ${missing[*]}" >&2
  exit 2
fi
command -v strace >/dev/null || echo "note: no strace: the SIGKILL-at-every-syscall matrix will be skipped"
[[ $(id -u) -eq 0 ]] || echo "note: not root: the pid-namespace and small-/dev/shm tests will be skipped"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT   # leave nothing behind in /tmp

step "python package + test extras (pip install '.[test]')"
python3 -m pip install --quiet --disable-pip-version-check '.[test]'

step "cargo test (unit, integration, header drift, fuzzing, doc tests; builds first, ~2 min cold)"
# Progress as it goes (what is compiling, each test binary and its result); pipefail keeps
# cargo's verdict.
cargo test --all-targets 2>&1 |
  grep --line-buffered -E '^ *(Compiling zcbuf|Finished|Running)|^test result|^error|panicked|FAILED|^failures'
cargo test --doc --quiet

step "C example, -Wall -Wextra -Werror against include/zcbuf.h"
cargo build --release --quiet
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
python3 -m pytest -q tests/python --basetemp "$out/pytest"
