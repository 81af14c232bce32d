#!/usr/bin/env bash
# Make a throw-away certificate authority and certificates for trying kvstore's TLS, with the
# system's openssl: the tests, bench/tls_bench.py and docs/OPERATIONS.md (TLS) use it.
#
#   scripts/make_tls_certs.sh DIR [NAME...]
#
# NAMEs (default: 127.0.0.1 localhost) go into the server certificate's subjectAltName (IP
# addresses as IP:, others as DNS:). Writes, in DIR:
#   ca.pem ca.key            the CA (self-signed, 2 days)
#   server.pem server.key    signed by ca.pem; serverAuth + clientAuth, so a daemon serves
#                            with it and presents it to a mutual-TLS master
#   client.pem client.key    signed by ca.pem; clientAuth (an engine's client certificate)
#   other-ca.pem             another CA (a "wrong CA" for a client to trust)
#   other-client.pem .key    signed by other-ca.pem (a client certificate the cluster refuses)
# Keys are P-256 EC, unencrypted, readable by their owner only. Not for production use.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 DIR [NAME...]" >&2
    exit 2
fi
dir=$1
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(127.0.0.1 localhost)
command -v openssl >/dev/null || { echo "$0: openssl not found" >&2; exit 3; }
mkdir -p "$dir"
cd "$dir"
umask 077

san=""
for name in "${names[@]}"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then entry="IP:$name"; else entry="DNS:$name"; fi
    san="${san:+$san,}$entry"
done

make_ca() {  # NAME: NAME.pem, NAME.key
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -keyout "$1.key" -out "$1.pem" -subj "/CN=kvstore test $1" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

make_leaf() {  # NAME CA EXTENDED_KEY_USAGE [SAN]
    local ext
    ext=$(mktemp)
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=$3"
        echo "subjectKeyIdentifier=hash"
        echo "authorityKeyIdentifier=keyid,issuer"
        [ -z "${4:-}" ] || echo "subjectAltName=$4"
    } >"$ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$1.key" -out "$1.csr" -subj "/CN=kvstore test $1" 2>/dev/null
    openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -days 2 \
        -extfile "$ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$ext"
}

make_ca ca
make_ca other-ca
make_leaf server ca "serverAuth,clientAuth" "$san"
make_leaf client ca "clientAuth"
make_leaf other-client other-ca "clientAuth"
rm -f ./*.srl other-ca.key
chmod 644 ./*.pem
echo "wrote $dir: ca.pem server.pem/.key client.pem/.key other-ca.pem other-client.pem/.key"
