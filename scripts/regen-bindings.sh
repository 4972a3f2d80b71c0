#!/usr/bin/env bash
# Regenerates src/ffi/bindings.rs from kernels/include/cdcl.h with bindgen (needs libclang,
# e.g. Debian's libclang-dev). The generation options live in tests/bindings.rs, which also
# fails on drift when libclang is present.
set -euo pipefail
cd "$(dirname "$0")/.."
CDCL_BLESS_BINDINGS=1 cargo test --quiet --test bindings
git --no-pager diff --stat -- src/ffi/bindings.rs
