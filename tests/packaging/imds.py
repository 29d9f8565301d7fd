"""A small IMDSv2 for the fleet test (moto has no instance metadata service): a PUT to
/latest/api/token with the TTL header hands out a token, and GETs need it (401 without), as on
an instance whose launch template requires tokens. It serves one instance's id, region and
tags; the Rust tests have the same stand-in in tests/common/aws.rs."""

import http.server
import secrets
import threading


class Imds:
    def __init__(self, instance_id, tags, region="us-east-1"):
        self.instance_id = instance_id
        self.tags = dict(tags)
        self.region = region
        self.tokens = set()
        self.unauthorized = 0
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
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
