#!/usr/bin/env bash
# Private CA, broker certificate, one client certificate per name, and the CRL the broker checks.
#   deploy/mosquitto/make-certs.sh OUT_DIR BROKER_HOST facegate-server door-1 door-2 ...   (issue/renew)
#   deploy/mosquitto/make-certs.sh revoke NAME [OUT_DIR]    (revoke NAME's certificate, rewrite crl.pem)
#   deploy/mosquitto/make-certs.sh acl SITE NAME            (print NAME's facegate.acl block for SITE)
#   deploy/mosquitto/make-certs.sh crl [OUT_DIR]            (re-issue crl.pem before it expires)
#   deploy/mosquitto/make-certs.sh bridge SITE [OUT_DIR]    (SITE's bridge certificate, CN bridge-SITE)
# OUT_DIR defaults to $FACEGATE_CERTS_DIR or deploy/certs. The client certificate's CN is the MQTT
# username the ACL uses. Keep ca.key offline. After revoke/crl, copy crl.pem to the broker and restart it.
set -euo pipefail
# Client and broker certificates last at most a year (renew with the first form; see README).
max_days=365
days=${FACEGATE_CERT_DAYS:-$max_days}
# The CRL's nextUpdate: a broker with an expired CRL refuses every client, so re-issue it with the
# yearly renewal (or `crl`) before then.
crl_days=${FACEGATE_CRL_DAYS:-400}
default_out=${FACEGATE_CERTS_DIR:-$(cd "$(dirname "$0")/.." && pwd)/certs}
if ! [[ $days =~ ^[0-9]+$ ]] || [ "$days" -lt 1 ] || [ "$days" -gt "$max_days" ]; then
  echo "FACEGATE_CERT_DAYS must be 1..$max_days (got $days)" >&2
  exit 2
fi

ca_db() {  # the openssl ca database that revoke and the CRL need
  [ -f index.txt ] || : > index.txt
  [ -f crlnumber ] || echo 1000 > crlnumber
  cat > ca.cnf <<CNF
[ ca ]
default_ca = facegate
[ facegate ]
database = index.txt
crlnumber = crlnumber
certificate = ca.crt
private_key = ca.key
default_md = sha256
default_crl_days = $crl_days
CNF
}

sign() {  # name cn ext
  local name=$1 cn=$2 ext=$3
  openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=$cn" \
    -keyout "$name.key" -out "$name.csr" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -days "$days" -sha256 -extfile "$ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$ext"
}

gencrl() {
  ca_db
  openssl ca -config ca.cnf -gencrl -out crl.pem 2>/dev/null
  chmod 644 crl.pem
}

case ${1:-} in
  revoke)
    if [ $# -lt 2 ]; then echo "usage: $0 revoke NAME [OUT_DIR]" >&2; exit 2; fi
    name=$2; out=${3:-$default_out}
    cd "$out"
    if [ ! -f "$name.crt" ]; then echo "no certificate $out/$name.crt" >&2; exit 1; fi
    ca_db
    openssl ca -config ca.cnf -revoke "$name.crt" 2>/dev/null
    gencrl
    echo "revoked $name; copy $out/crl.pem to the broker and restart it"
    exit 0 ;;
  acl)
    if [ $# -ne 3 ]; then echo "usage: $0 acl SITE NAME" >&2; exit 2; fi
    printf 'user %s\n' "$3"
    for rule in "read facegate/$2/bundles/announce" "read facegate/$2/bundles/+/chunk" \
                "read facegate/$2/bundles/delta" "write facegate/$2/$3/bundle/request" \
                "read facegate/$2/$3/bundle/chunk"; do
      printf 'topic %s\n' "$rule"
    done
    exit 0 ;;
  bridge)  # the client certificate a site broker's bridge presents to this (central) broker
    if [ $# -lt 2 ] || ! [[ $2 =~ ^[A-Za-z0-9_-]+$ ]]; then
      echo "usage: $0 bridge SITE [OUT_DIR] (SITE: letters, digits, _ and -)" >&2; exit 2
    fi
    name=bridge-$2; out=${3:-$default_out}
    if [ ! -f "$out/ca.key" ]; then echo "no CA in $out: issue the central broker's certificates first" >&2; exit 1; fi
    cd "$out"
    umask 077
    printf 'extendedKeyUsage=clientAuth\n' > "$name.ext"
    sign "$name" "$name" "$name.ext"
    chmod 600 "$name.key"
    chmod 644 "$name.crt"
    echo "issued $out/$name.crt/.key for the site broker, with ca.crt; the central ACL block and the bridge" \
         "stanza: facegate server bridge-config --site $2 [--acl]"
    exit 0 ;;
  crl)
    out=${2:-$default_out}
    cd "$out"
    gencrl
    echo "re-issued $out/crl.pem (valid $crl_days days)"
    exit 0 ;;
esac

if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR BROKER_HOST [CLIENT_CN ...] | revoke NAME [OUT_DIR] | crl [OUT_DIR] |" \
       "bridge SITE [OUT_DIR] | acl SITE NAME" >&2
  exit 2
fi
out=$1; host=$2; shift 2
mkdir -p "$out"
umask 077
cd "$out"

if [ ! -f ca.key ]; then
  openssl req -x509 -new -newkey rsa:3072 -nodes -sha256 -days 3650 \
    -subj "/CN=facegate-ca" -keyout ca.key -out ca.crt 2>/dev/null
fi

if [[ $host =~ ^[0-9.]+$ ]]; then san="IP:$host"; else san="DNS:$host"; fi
printf 'subjectAltName=%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$san" > server.ext
sign server "$host" server.ext

for cn in "$@"; do
  printf 'extendedKeyUsage=clientAuth\n' > "$cn.ext"
  sign "$cn" "$cn" "$cn.ext"
done
gencrl
chmod 600 ./*.key
chmod 644 ./*.crt
echo "certificates in $out: ca.crt crl.pem server.crt/key $(printf '%s.crt ' "$@")"
