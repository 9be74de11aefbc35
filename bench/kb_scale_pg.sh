#!/bin/bash
# bench/kb_scale.py with the Milvus store's metadata in a throwaway PostgreSQL (started as tests/test_store.py
# starts one: initdb and pg_ctl as the postgres user, trust auth, loopback only), stopped after. Run as root:
#   flock /tmp/bench.lock bench/kb_scale_pg.sh
set -u
cd "$(dirname "$0")/.."
root=$(mktemp -d /tmp/v-pg-XXXX); data=$root/pg; mkdir $data; chown -R postgres $root
port=${PORT:-55437}
runuser -u postgres -- initdb -D $data -A trust -U fleet >/dev/null
runuser -u postgres -- pg_ctl -D $data -o "-p $port -k $data -c listen_addresses=127.0.0.1" -w -l $data/log start >/dev/null
nice timeout 900 .venv/bin/python bench/kb_scale.py --chunks 10000 --files 1000 --queries 200 \
  --meta-url postgresql://fleet@127.0.0.1:$port/postgres
runuser -u postgres -- pg_ctl -D $data -m immediate stop >/dev/null
rm -rf $root
