#!/usr/bin/env python3
"""A tiny payments service to put idempotency-proxy in front of (Python standard library only).

    python3 examples/upstream.py [--port 3000]

POST /payments  charges a card: takes 0.5 s, counts the charge, answers 201 with a charge id.
GET  /charges   how many charges ran (to see that a retried POST did not charge twice).
POST /feed/...  an endpoint the example config leaves unprotected.

The service itself does nothing about retries; the proxy in front of it does. With
`forward_lease = true` (the example config sets it on /payments) it also fences its charges: the
proxy sends `Idempotency-Lease-Token`, a takeover always a larger one, and a charge whose token is
older than the newest this service has seen for the key is refused (409), so a proxy that stalled
past lock_ttl cannot charge after its takeover did.
"""

import argparse
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

charges = itertools.count(1)
charged = 0
lock = threading.Lock()
# Idempotency-Key -> the newest lease token seen for it. (A real service keeps this in the row
# it writes, and checks it in the same statement: UPDATE ... WHERE last_fence < $token.)
newest_token = {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/charges":
            self._reply(200, {"charges": charged})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self):
        global charged
        length = int(self.headers.get("Content-Length", 0))
        request = self.rfile.read(length)
        if self.path.startswith("/payments"):
            key = self.headers.get("Idempotency-Key")
            token = self.headers.get("Idempotency-Lease-Token")
            token = int(token) if token and token.isdigit() else None
            if key and token is not None:
                with lock:  # seen on arrival: a takeover fences the older run even mid-flight
                    newest_token[key] = max(newest_token.get(key, 0), token)
            time.sleep(0.5)  # the slow part: talking to the card network
            with lock:
                if key and token is not None and token < newest_token[key]:
                    stale = True
                else:
                    stale = False
                    charged += 1
                    charge_id = next(charges)
            if stale:
                self._reply(409, {"error": "a newer attempt of this request owns it",
                                  "token": token, "newest": newest_token[key]})
                return
            self._reply(201, {"charge": f"ch_{charge_id}", "request": request.decode(errors="replace")})
        elif self.path.startswith("/feed"):
            self._reply(200, {"ok": True})
        else:
            self._reply(404, {"error": "not found"})

    def log_message(self, format, *args):
        print(f"upstream: {self.command} {self.path} key={self.headers.get('Idempotency-Key')}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"upstream listening on http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
