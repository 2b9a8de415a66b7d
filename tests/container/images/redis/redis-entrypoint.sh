#!/bin/sh
# redis-server as user redis, protected mode off (compose's other services reach it by name); other commands as given.
set -e
if [ "$1" = redis-server ]; then
  shift
  chown -R redis:redis /data
  exec setpriv --reuid=redis --regid=redis --init-groups redis-server "$@" --protected-mode no
fi
exec "$@"
