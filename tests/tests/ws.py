# A WebSocket server and client (the `websockets` package from PyPI), independent of Trellis, for tests/tests/http.rs.
#   python3 ws.py server HOST PORT            echoes every message; prints "listening" once it accepts
#   python3 ws.py client HOST:PORT COUNT [TOKEN]  sends COUNT messages, checks each echo; prints a JSON result
import json
import sys

import websockets
from websockets.sync.client import connect
from websockets.sync.server import serve

if sys.argv[1] == "server":

    def echo(ws):
        for message in ws:
            ws.send(message)

    with serve(echo, sys.argv[2], int(sys.argv[3]), compression=None) as server:
        print("listening", flush=True)
        server.serve_forever()
else:
    address, count = sys.argv[2], int(sys.argv[3])
    headers = {"Authorization": "Bearer " + sys.argv[4]} if len(sys.argv) > 4 else None
    try:
        with connect(f"ws://{address}/chat", additional_headers=headers, proxy=None, compression=None,
                     open_timeout=20) as ws:
            for i in range(count):
                message = f"message {i} " + "x" * (i % 100)
                ws.send(message)
                got = ws.recv(timeout=20)
                if got != message:
                    raise SystemExit(f"message {i}: got {got!r}")
        print(json.dumps({"echoed": count}))
    except websockets.exceptions.InvalidStatus as e:
        print(json.dumps({"status": e.response.status_code, "body": e.response.body.decode(errors="replace")}))
