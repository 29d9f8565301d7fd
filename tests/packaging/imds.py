"""A small IMDSv2 for the fleet test and the lab (moto has no instance metadata service): a PUT
to /latest/api/token with the TTL header hands out a token, and GETs need it (401 without), as
on an instance whose launch template requires tokens. It serves one instance's id, region,
availability zone, tags and instance-role credentials (any key works against moto); the Rust
tests have the same stand-in in tests/common/aws.rs.

The lab runs it inside each instance's network namespace on 169.254.169.254:80, the default
endpoint, as `python imds.py --instance-id ID --tags-json '{...}' --host 169.254.169.254
--port 80`; it prints `ready URL` once it listens."""

import argparse
import datetime
import http.server
import json
import secrets
import signal
import sys
import threading

ROLE = "static-ingress-lab"


class Imds:
    def __init__(self, instance_id, tags, region="us-east-1", host="127.0.0.1", port=0, zone=None,
                 lifecycle_state_file=None):
        self.instance_id = instance_id
        # The Auto Scaling target lifecycle state, read from this file at each request (the lab
        # writes it to retire the instance); no file: 404, as for an instance in no group.
        self.lifecycle_state_file = lifecycle_state_file
        self.tags = dict(tags)
        self.region = region
        self.zone = zone or region + "a"
        self.tokens = set()
        self.unauthorized = 0
        self._server = http.server.ThreadingHTTPServer((host, port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self):
        host, port = self._server.server_address
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _answer(self, path):
        if path == "/latest/meta-data/instance-id":
            return self.instance_id
        if path == "/latest/meta-data/placement/region":
            return self.region
        if path == "/latest/meta-data/placement/availability-zone":
            return self.zone
        if path == "/latest/meta-data/iam/security-credentials/":
            return ROLE
        if path == f"/latest/meta-data/iam/security-credentials/{ROLE}":
            expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=6)
            return json.dumps({
                "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIALABINSTANCEROLE",
                "SecretAccessKey": "lab-secret", "Token": "lab-token",
                "LastUpdated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            })
        if path == "/latest/meta-data/autoscaling/target-lifecycle-state":
            try:
                return open(self.lifecycle_state_file).read().strip() if self.lifecycle_state_file else None
            except FileNotFoundError:
                return None
        if path == "/latest/meta-data/tags/instance":
            return "\n".join(self.tags)
        prefix = "/latest/meta-data/tags/instance/"
        if path.startswith(prefix):
            return self.tags.get(path[len(prefix):])
        return None

    def _handler(self):
        imds = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body="", headers=()):
                data = body.encode()
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if self.path != "/latest/api/token" or not ttl:
                    return self._reply(400)
                token = secrets.token_hex(16)
                imds.tokens.add(token)
                self._reply(200, token, [("X-aws-ec2-metadata-token-ttl-seconds", ttl)])

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") not in imds.tokens:
                    imds.unauthorized += 1
                    return self._reply(401)
                body = imds._answer(self.path)
                if body is None:
                    return self._reply(404)
                self._reply(200, body)

        return Handler


def main():
    ap = argparse.ArgumentParser(description="IMDSv2 stand-in for one instance")
    ap.add_argument("--instance-id", required=True)
    ap.add_argument("--tags-json", required=True, help="the instance's tags as a JSON object")
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--zone")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--lifecycle-state-file", help="serves its content as the Auto Scaling target lifecycle state")
    args = ap.parse_args()
    imds = Imds(args.instance_id, json.loads(args.tags_json), args.region, args.host, args.port, args.zone,
                args.lifecycle_state_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with imds:
        print("ready", imds.url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
