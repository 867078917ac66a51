# An HTTP/1.1 server whose response body stops half way until a file exists, for tests/tests/http.rs.
#   python3 slow_body.py server HOST PORT RELEASE_FILE
# Every GET gets 200 with a 10-byte body: "first" at once, "-last" once RELEASE_FILE exists.
import http.server
import os
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "10")
        self.end_headers()
        self.wfile.write(b"first")
        self.wfile.flush()
        while not os.path.exists(sys.argv[4]):
            time.sleep(0.02)
        self.wfile.write(b"-last")

    def log_message(self, *args):
        pass


server = http.server.HTTPServer((sys.argv[2], int(sys.argv[3])), Handler)
print("listening", flush=True)
server.serve_forever()
