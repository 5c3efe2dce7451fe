#!/usr/bin/env bash
# RUSTC_WRAPPER for the fuzz build (scripts/fuzz.sh): compiles third-party cryptography without
# coverage instrumentation. Its branches say nothing about keyhold's handling of input, and
# instrumented X25519 made each link-target input several times slower.
rustc=$1
shift
case " $* " in
*" --crate-name curve25519_dalek "* | *" --crate-name x25519_dalek "* | *" --crate-name ring "* | \
    *" --crate-name snow "* | *" --crate-name sha2 "* | *" --crate-name hkdf "* | \
    *" --crate-name hmac "* | *" --crate-name digest "* | *" --crate-name subtle "* | \
    *" --crate-name block_buffer "* | *" --crate-name generic_array "*)
    args=()
    for a in "$@"; do
        case $a in
        -Cpasses=sancov-module | -Cllvm-args=-sanitizer-coverage*) ;;
        *) args+=("$a") ;;
        esac
    done
    exec "$rustc" "${args[@]}"
    ;;
esac
exec "$rustc" "$@"
