#!/usr/bin/env bash
# The channel cipher (AES-256-GCM, as the key table keeps it in secret memory) sealing and
# opening 64 KiB messages on one core, next to OpenSSL's AES-256-GCM measured in the same run.
#
#   scripts/bench-aead.sh [SIZE] [SECONDS]        (defaults: 65536, 3)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-65536}
secs=${2:-3}
cargo bench -q -p keyhold-devices --bench aead -- "$size" "$secs"
if command -v openssl >/dev/null; then
    openssl speed -evp aes-256-gcm -bytes "$size" -seconds "$secs" 2>/dev/null |
        awk -v size="$size" '/^AES-256-GCM/ { v = $2; sub(/k$/, "", v); printf "OpenSSL AES-256-GCM (%s-byte messages, one core, same run): %.2f GB/s\n", size, v * 1000 / 1e9 }'
else
    echo "openssl is not installed: no baseline (apt-get install openssl)"
fi
