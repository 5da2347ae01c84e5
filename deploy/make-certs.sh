#!/usr/bin/env bash
# The certificate step of ferry's TLS: a CA of this deployment's own, and the coordinator's
# certificate signed by it.
#
#   deploy/make-certs.sh DIR NAME...
#
# writes into DIR (created, mode 700):
#   ca.crt    the CA certificate: workers and `ferry status` verify the coordinator with it
#             (--tls-ca or FERRY_TLS_CA)
#   tls.crt   the coordinator's certificate (--tls-cert), valid for every NAME and for
#             localhost and 127.0.0.1
#   tls.key   its private key (--tls-key)
# Every file is readable by you only (umask 077). The CA's own key is deleted once it has
# signed: it can sign nothing else, so the CA vouches for this one coordinator certificate
# and nothing more. Make new files, and give everyone the new ca.crt, to change anything.
#
# The NAMEs are the host names clients dial (the host of their --coordinator, or their
# --tls-domain): `ferry-coordinator` and `ferry-coordinator.NAMESPACE.svc` on Kubernetes,
# the compose service's name under compose, the first node's host name under Slurm. A NAME
# that is an IPv4 or IPv6 address becomes an IP entry of the certificate.
#
# Run again with the same DIR, it keeps what is there when the CA still verifies the
# certificate, the certificate covers every NAME and stays valid for 30 more days;
# otherwise it makes new ones. So compose and Slurm can run it before every start.
# Needs openssl (1.1.1 or newer). DAYS (default 825) sets how long the certificate is valid.
set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    echo "usage: $0 DIR [NAME...]   (see the comment at the top of this script)" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed" >&2; exit 1; }
umask 077
dir=$1
shift
days=${DAYS:-825}

# The names, with localhost and 127.0.0.1 (for `ferry status` beside the coordinator), once
# each, in order.
names=()
for n in "$@" localhost 127.0.0.1; do
    [ -n "$n" ] || continue
    case " ${names[*]} " in *" $n "*) ;; *) names+=("$n") ;; esac
done
is_ip() { [[ $1 =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $1 == *:* ]]; }

mkdir -p "$dir"
chmod 700 "$dir"

# Keep what is there if it is still right.
if [ -s "$dir/ca.crt" ] && [ -s "$dir/tls.crt" ] && [ -s "$dir/tls.key" ] \
    && openssl verify -CAfile "$dir/ca.crt" "$dir/tls.crt" >/dev/null 2>&1 \
    && openssl x509 -in "$dir/tls.crt" -noout -checkend $((30 * 86400)) >/dev/null 2>&1; then
    keep=1
    for n in "${names[@]}"; do
        if is_ip "$n"; then check=(-checkip "$n"); else check=(-checkhost "$n"); fi
        openssl x509 -in "$dir/tls.crt" -noout "${check[@]}" 2>/dev/null | grep -q ' does match ' \
            || { keep=0; break; }
    done
    if [ "$keep" = 1 ]; then
        echo "make-certs: $dir already holds a certificate for ${names[*]}; kept" >&2
        exit 0
    fi
fi

work=$(mktemp -d "$dir/.make-certs.XXXXXX")
trap 'rm -rf "$work"' EXIT

san=
for n in "${names[@]}"; do
    if is_ip "$n"; then san+="${san:+,}IP:$n"; else san+="${san:+,}DNS:$n"; fi
done

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
serial() { echo "0x$(openssl rand -hex 16)"; }

# The CA: a self-signed certificate that may sign (keyCertSign) exactly one level below it.
newkey "$work/ca.key"
cat >"$work/ca.ext" <<EOF
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
openssl req -new -key "$work/ca.key" -subj "/CN=ferry deployment CA $(date -u +%Y%m%dT%H%M%SZ)" \
    -out "$work/ca.csr"
openssl x509 -req -in "$work/ca.csr" -signkey "$work/ca.key" -days $((days + 1)) -sha256 \
    -set_serial "$(serial)" -extfile "$work/ca.ext" -out "$work/ca.crt" 2>/dev/null

# The coordinator's certificate: a TLS server (serverAuth) for the names, not a CA.
newkey "$work/tls.key"
cat >"$work/tls.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san
authorityKeyIdentifier = keyid
EOF
openssl req -new -key "$work/tls.key" -subj "/CN=${names[0]}" -out "$work/tls.csr"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -days "$days" \
    -sha256 -set_serial "$(serial)" -extfile "$work/tls.ext" -out "$work/tls.crt" 2>/dev/null
openssl verify -CAfile "$work/ca.crt" "$work/tls.crt" >/dev/null

# Into place.
rm -f "$dir/ca.crt"
mv -f "$work/tls.key" "$dir/tls.key"
mv -f "$work/tls.crt" "$dir/tls.crt"
mv -f "$work/ca.crt" "$dir/ca.crt"
echo "make-certs: $dir: ca.crt, tls.crt and tls.key for ${names[*]} (valid $days days)" >&2
