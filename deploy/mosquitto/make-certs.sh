#!/usr/bin/env bash
# Make a private CA, the broker's server certificate and one client certificate per name.
#   deploy/mosquitto/make-certs.sh OUT_DIR BROKER_HOST facegate-server door-1 door-2 ...
# The client certificate's CN is the MQTT username the ACL uses. Keep ca.key offline.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR BROKER_HOST [CLIENT_CN ...]" >&2
  exit 2
fi
out=$1; host=$2; shift 2
days=${FACEGATE_CERT_DAYS:-825}
mkdir -p "$out"
umask 077
cd "$out"

if [ ! -f ca.key ]; then
  openssl req -x509 -new -newkey rsa:3072 -nodes -sha256 -days 3650 \
    -subj "/CN=facegate-ca" -keyout ca.key -out ca.crt 2>/dev/null
fi

sign() {  # name cn ext
  local name=$1 cn=$2 ext=$3
  openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=$cn" \
    -keyout "$name.key" -out "$name.csr" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -days "$days" -sha256 -extfile "$ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$ext"
}

if [[ $host =~ ^[0-9.]+$ ]]; then san="IP:$host"; else san="DNS:$host"; fi
printf 'subjectAltName=%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$san" > server.ext
sign server "$host" server.ext

for cn in "$@"; do
  printf 'extendedKeyUsage=clientAuth\n' > "$cn.ext"
  sign "$cn" "$cn" "$cn.ext"
done
chmod 600 ./*.key
chmod 644 ./*.crt
echo "certificates in $out: ca.crt server.crt/key $(printf '%s.crt ' "$@")"
